"""JSON in one place: orjson for speed, strict about what counts as JSON."""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises `JSONDecodeError` (a `ValueError`) on anything that is not JSON."""
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Serialise to compact UTF-8 JSON; datetimes become RFC 3339 strings."""
    return orjson.dumps(value, option=orjson.OPT_UTC_Z)


def encoded(json: bytes) -> Any:
    """JSON encoded already, to be embedded as it is in a value passed to `dumps`."""
    return orjson.Fragment(json)
