"""Build the published envelope for a stored webhook. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from schemas import codec
from schemas.events import EVENT_TYPE_BY_KIND, SCHEMA_VERSION, CallEvent, CallFields
from schemas.topology import event_routing_key, routing_key_of
from workers.delivery import ReceivedWebhook


@dataclass(frozen=True)
class OutboxEvent:
    """An event as stored in `call_events.event` and published to `{ns}.events`: the same
    bytes both ways, encoded once."""

    event_id: str
    routing_key: str
    body: bytes


def build_event(webhook: ReceivedWebhook, call: CallFields) -> CallEvent:
    return CallEvent(
        event_id=webhook.event_id,
        type=EVENT_TYPE_BY_KIND[webhook.kind],
        occurred_at=call.called_at,
        received_at=webhook.received_at,
        project=webhook.project,
        call=call,
        raw=webhook.document,
    )


def stored_to_outbox(event_id: str, envelope: dict[str, Any]) -> OutboxEvent:
    """An envelope read back from `call_events.event` (left unpublished by a crash)."""
    return OutboxEvent(event_id, routing_key_of(envelope), codec.dumps(envelope))


CALL_FIELDS: tuple[str, ...] = tuple(CallFields.model_fields)


class Row(Protocol):
    """A `calls` row by column name (a dict, or the database driver's record)."""

    def __getitem__(self, column: str, /) -> Any: ...


def render_outbox(webhook: ReceivedWebhook, row: Row) -> OutboxEvent:
    """The event of a stored webhook from its merged `calls` row, encoded once.

    The same JSON as `build_event(webhook, CallFields(**row)).to_json_dict()` (a test holds
    them equal), built without the models: the row is typed by PostgreSQL already, and
    validating each event again costs more than the rest of its way through the worker.
    """
    event_type = EVENT_TYPE_BY_KIND[webhook.kind]
    envelope = {
        "event_id": webhook.event_id,
        "type": event_type,
        "schema": SCHEMA_VERSION,
        "occurred_at": row["called_at"],
        "received_at": webhook.received_at,
        "project": webhook.project,
        "call": {name: row[name] for name in CALL_FIELDS},
        "raw": codec.encoded(webhook.document_json),  # as received, not encoded again
    }
    routing_key = event_routing_key(event_type, row["outcome"])
    return OutboxEvent(webhook.event_id, routing_key, codec.dumps(envelope))
