"""Decode one message from a call queue into a received webhook. The only AMQP parser."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.roistat import CallEndPayload, InvalidWebhookError, parse_webhook
from schemas.topology import (
    HEADER_KIND,
    HEADER_PROJECT,
    HEADER_RECEIVED_AT,
    KINDS,
    Kind,
    event_id,
)
from workers.errors import PermanentError


@dataclass(frozen=True)
class ReceivedWebhook:
    """A webhook as the ingress accepted it, with who sent it and when."""

    project: str
    kind: Kind
    received_at: datetime
    payload: CallEndPayload
    document: dict[str, Any]
    document_json: bytes  # `document` as JSON text (the body as received, see `Webhook`)
    call_id: str  # `payload.id`
    event_id: str  # `{project}:{call_id}:{kind}`, read many times on the way: made once


def decode_delivery(body: bytes, headers: dict[str, str], queue_kind: Kind) -> ReceivedWebhook:
    """Read the ingress's headers and the raw body; `PermanentError` if it can never be a call."""
    project = headers.get(HEADER_PROJECT, "").strip()
    if not project:
        raise PermanentError(f"missing header {HEADER_PROJECT}")
    kind = headers.get(HEADER_KIND, queue_kind)
    if kind not in KINDS:
        raise PermanentError(f"header {HEADER_KIND} is {kind!r}, expected start or end")
    received_at = _received_at(headers.get(HEADER_RECEIVED_AT))
    try:
        webhook = parse_webhook(body, kind)
    except InvalidWebhookError as exc:
        raise PermanentError(f"{exc.reason}: {exc.message}") from exc
    return ReceivedWebhook(
        project=project,
        kind=webhook.kind,
        received_at=received_at,
        payload=webhook.payload,
        document=webhook.document,
        document_json=webhook.document_json,
        call_id=webhook.payload.id,
        event_id=event_id(project, webhook.payload.id, webhook.kind),
    )


def _received_at(value: str | None) -> datetime:
    if value is None:
        # A message published by hand: it is being received now, as far as we know.
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise PermanentError(f"header {HEADER_RECEIVED_AT} is not ISO 8601: {value!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
