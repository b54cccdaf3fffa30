"""Webhook URL tokens to projects."""

from __future__ import annotations

import pytest

from infra.settings import parse_tokens
from ingress.auth import TokenMap

TOKENS = TokenMap({"abc123": "shop", "def456": "blog", "токен": "магазин"})


@pytest.mark.parametrize(
    ("token", "project"),
    [
        ("abc123", "shop"),
        ("def456", "blog"),
        ("токен", "магазин"),
        ("", None),
        ("abc", None),
        ("abc1234", None),
        ("ABC123", None),
        (" abc123", None),
        ("shop", None),
        ("ток", None),
    ],
)
def test_project_for(token: str, project: str | None) -> None:
    assert TOKENS.project_for(token) == project


def test_len() -> None:
    assert len(TOKENS) == 3
    assert len(TokenMap({})) == 0


def test_empty_map_knows_no_token() -> None:
    assert TokenMap({}).project_for("abc123") is None
    assert TokenMap({}).project_for("") is None


def test_built_from_settings_spec() -> None:
    tokens = TokenMap(parse_tokens("shop:abc,blog:def"))
    assert tokens.project_for("abc") == "shop"
    assert tokens.project_for("def") == "blog"
    assert tokens.project_for("shop") is None
