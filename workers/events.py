"""Build the published envelope for a stored webhook. Pure."""

from __future__ import annotations

from typing import Any

from schemas.events import EVENT_TYPE_BY_KIND, CallEvent, CallFields
from schemas.topology import event_routing_key
from workers.delivery import ReceivedWebhook


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


def routing_key_of(event: dict[str, Any]) -> str:
    """The routing key of a stored envelope: `call.started` or `call.ended.<outcome>`."""
    call = event.get("call") or {}
    return event_routing_key(str(event.get("type")), call.get("outcome"))
