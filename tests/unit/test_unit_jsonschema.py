"""The JSON Schema files under schemas/json/ must match the models."""

from __future__ import annotations

import json

import pytest

from schemas.jsonschema import JSON_DIR, MODELS, render

REGENERATE = "schemas/json/ is stale: run `python -m schemas.jsonschema` and commit the result"


def test_every_model_has_a_file_and_no_file_is_orphaned() -> None:
    on_disk = {path.name for path in JSON_DIR.glob("*.json")}
    assert on_disk == set(MODELS), REGENERATE


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_file_is_up_to_date(name: str) -> None:
    path = JSON_DIR / name
    assert path.is_file(), f"{path} is missing; {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render()[name], REGENERATE


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_file_is_valid_json_with_an_id(name: str) -> None:
    schema = json.loads((JSON_DIR / name).read_text(encoding="utf-8"))
    assert schema["$id"] == f"callpipe/{name}"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_payload_schemas_require_only_the_id_and_allow_unknown_fields() -> None:
    for name in ("call-start.schema.json", "call-end.schema.json"):
        schema = json.loads(render()[name])
        assert schema["required"] == ["id"], name
        assert schema.get("additionalProperties", True) is not False, name


def test_event_schema_uses_the_wire_name_schema() -> None:
    schema = json.loads(render()["call-event.schema.json"])
    assert "schema" in schema["properties"]
    assert "schema_" not in schema["properties"]
