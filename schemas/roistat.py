"""Roistat call-tracking webhook payloads, read leniently.

Real payloads drift: unknown fields, numbers as strings and strings as numbers,
empty strings for nulls, Cyrillic text. None of that may lose a call, so every
field but `id` falls back to "missing" rather than failing validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from schemas import codec
from schemas.topology import Kind

# orjson reads 1024 levels but writes only 254, and a worker writes the payload again
# (jsonb, and as `raw` inside the event envelope): refuse at the door what it cannot store.
MAX_NESTING = 128

# The event id `{project}:{call_id}:{kind}` is the AMQP message id, at most 255 bytes.
MAX_CALL_ID_BYTES = 128

UTF8_BOM = b"\xef\xbb\xbf"

# Longer is not a phone call but garbage; it would not fit PostgreSQL's integer either.
MAX_DURATION_S = 7 * 24 * 3600


class InvalidWebhookError(ValueError):
    """A body that can never become a call: `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def call_id_of(value: Any) -> str | None:
    """The call id as text, or None when `value` is not a usable id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number_text(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        return text or None
    return None


def read_webhook(body: bytes) -> dict[str, Any]:
    """Decode a webhook body: a JSON object with a usable `id`, or `InvalidWebhookError`."""
    try:
        # Some senders prefix UTF-8 with a byte-order mark; it is not part of the JSON.
        document = codec.loads(body.removeprefix(UTF8_BOM))
    except codec.JSONDecodeError as exc:
        raise _decode_error(body, exc) from exc
    # Nesting deeper than the limit needs more opening brackets than the limit: counting
    # them in C spares the walk over every ordinary webhook on the hot path.
    opening = body.count(b"{") + body.count(b"[")
    if opening > MAX_NESTING and _nests_deeper_than(document, MAX_NESTING):
        raise InvalidWebhookError("too_deep", f"body nests JSON deeper than {MAX_NESTING} levels")
    if not isinstance(document, dict):
        raise InvalidWebhookError(
            "not_object", f"body must be a JSON object, got a JSON {_json_type(document)}"
        )
    call_id = call_id_of(document.get("id"))
    if call_id is None:
        raise InvalidWebhookError(
            "missing_id", 'body has no usable "id": it must be a non-empty string or a number'
        )
    if len(call_id.encode()) > MAX_CALL_ID_BYTES:
        raise InvalidWebhookError(
            "id_too_long", f'"id" is longer than {MAX_CALL_ID_BYTES} bytes: not a Roistat call id'
        )
    return document


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _decode_error(body: bytes, exc: ValueError) -> InvalidWebhookError:
    detail = str(exc)
    if "utf-8" in detail.lower() or "utf8" in detail.lower():
        return InvalidWebhookError("not_utf8", "body is not valid UTF-8")
    if "depth" in detail.lower() or "recursion" in detail.lower():
        return InvalidWebhookError("too_deep", f"body nests JSON deeper than {MAX_NESTING} levels")
    if not body.strip():
        return InvalidWebhookError("not_json", "body is empty: expected a JSON object")
    return InvalidWebhookError("not_json", f"body is not JSON: {detail}")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null"


def _without_nul(value: Any) -> Any:
    """U+0000 replaced by U+FFFD: PostgreSQL text and jsonb cannot store it, and a call
    must not be lost for one invisible character."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def detect_kind(document: dict[str, Any]) -> Kind:
    """For `POST /roistat/{token}`: a body with a non-null `status` or `duration` ends a call."""
    for field in ("status", "duration"):
        value = document.get(field)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return "end"
    return "start"


# --- lenient field types --------------------------------------------------------------


def _text(value: Any) -> str | None:
    """Any scalar as text; empty means missing; a nested value is kept as its JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        return text or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number_text(value) if math.isfinite(value) else None
    return codec.dumps(value).decode()


def _whole_number(value: Any) -> int | None:
    """A count of seconds from 35, 35.0, "35" or " 35.0 "; anything else is missing."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().replace(",", "."))
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value):
        value = math.floor(value + 0.5)  # half up: 34.5 s is 35 s, not banker's 34
    if isinstance(value, int) and 0 <= value <= MAX_DURATION_S:
        return value
    return None


def _custom_fields(value: Any) -> list[Any] | dict[str, Any] | None:
    """A list or an object (also as a JSON string); empty or anything else is missing."""
    if isinstance(value, str):
        try:
            value = codec.loads(value)
        except codec.JSONDecodeError:
            return None
        if _nests_deeper_than(value, MAX_NESTING):
            return None
    if isinstance(value, list | dict) and value:
        return value
    return None


Text = Annotated[str | None, BeforeValidator(_text)]
WholeNumber = Annotated[int | None, BeforeValidator(_whole_number)]
CustomFields = Annotated[list[Any] | dict[str, Any] | None, BeforeValidator(_custom_fields)]


class CallStartPayload(BaseModel):
    """What Roistat posts when it dials. Unknown fields are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    caller: Text = None
    callee: Text = None
    visit_id: Text = None
    marker: Text = None
    order_id: Text = None
    date: Text = None
    google_client_id: Text = None
    metrika_client_id: Text = None
    custom_fields: CustomFields = None
    landing_page: Text = None
    domain: Text = None
    city: Text = None
    country: Text = None
    ip: Text = None
    first_visit: Text = None
    referrer: Text = None
    utm_source: Text = None
    utm_medium: Text = None
    utm_campaign: Text = None
    utm_term: Text = None
    utm_content: Text = None
    roistat_param_1: Text = None
    roistat_param_2: Text = None
    roistat_param_3: Text = None
    roistat_param_4: Text = None
    roistat_param_5: Text = None
    source_level_1: Text = None
    source_level_2: Text = None

    @model_validator(mode="before")
    @classmethod
    def _usable_id(cls, data: Any) -> Any:
        if isinstance(data, dict):
            call_id = call_id_of(data.get("id"))
            if call_id is not None:
                return {**data, "id": call_id}
        return data


class CallEndPayload(CallStartPayload):
    """What Roistat posts after the call: the start's fields plus the result."""

    status: Text = None
    file_id: Text = None
    duration: WholeNumber = None
    link: Text = None


@dataclass(frozen=True)
class Webhook:
    """One decoded webhook: the lenient model and the object exactly as received."""

    kind: Kind
    payload: CallEndPayload
    document: dict[str, Any]
    # `document` as JSON text, for storing and publishing it without encoding it again: the
    # body as received (less a byte-order mark), or re-encoded where NULs were replaced.
    document_json: bytes


def parse_webhook(body: bytes, kind: Kind) -> Webhook:
    """Decode and validate a webhook body; raises `InvalidWebhookError` only for no object or id."""
    document = read_webhook(body)
    document_json = body.removeprefix(UTF8_BOM)
    if b"\\u0000" in body:
        document = _without_nul(document)
        document_json = codec.dumps(document)
    # Both kinds share one model: a start that already carries end fields keeps them.
    payload = CallEndPayload.model_validate(document)
    return Webhook(kind=kind, payload=payload, document=document, document_json=document_json)
