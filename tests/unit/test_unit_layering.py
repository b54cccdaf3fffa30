"""The packages import downwards only: entry points on top, shared code below (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each package may import of ours, besides itself.
MAY_IMPORT: dict[str, set[str]] = {
    "schemas": set(),
    "infra": {"schemas"},
    "ingress": {"infra", "schemas"},
    "workers": {"infra", "schemas"},
    "sinks": {"infra", "schemas", "workers"},
    "callpipe": {"infra", "schemas", "ingress", "workers", "sinks"},
}
OURS = set(MAY_IMPORT)


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that a module imports, anywhere in it (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    wrong = {
        str(path.relative_to(ROOT)): sorted(above)
        for path in sorted((ROOT / package).rglob("*.py"))
        if (above := imported_packages(path) - allowed)
    }
    assert wrong == {}


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("def run() -> None:\n    from workers.service import run_worker\n")
    assert imported_packages(module) == {"workers"}
