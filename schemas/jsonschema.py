"""JSON Schema files for downstream teams, generated from the models.

Regenerate after changing a model: `python -m schemas.jsonschema`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.events import CallEvent
from schemas.roistat import CallEndPayload, CallStartPayload

JSON_DIR = Path(__file__).parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "call-start.schema.json": CallStartPayload,
    "call-end.schema.json": CallEndPayload,
    "call-event.schema.json": CallEvent,
}


def render() -> dict[str, str]:
    """File name → schema text, exactly as it should be on disk."""
    rendered = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(mode="serialization", by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"callpipe/{name}"
        rendered[name] = json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    return rendered


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (JSON_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {JSON_DIR / name}")


if __name__ == "__main__":
    main()
