"""One webhook's way through a worker: enrich → store (once) → publish its event (once)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from workers.delivery import ReceivedWebhook
from workers.enrich import enrich
from workers.events import build_event
from workers.phones import mask_phone
from workers.storage import CallStore, Recorded

log = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """The port that sends a stored envelope to `{ns}.events`; raises `TransientError`."""

    async def publish_event(self, event: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Pipeline:
    store: CallStore
    events: EventPublisher
    region: str
    tz: ZoneInfo

    async def process(self, webhook: ReceivedWebhook) -> Recorded:
        call = enrich(webhook.payload, region=self.region, tz=self.tz)
        recorded = await self.store.record(
            webhook, call, partial(build_event, webhook), self.events.publish_event
        )
        log.info(
            "call %s %s from %s: %s%s",
            webhook.event_id,
            call.outcome or "started",
            mask_phone(call.caller),
            "stored" if recorded.stored else "duplicate",
            ", event published" if recorded.published else "",
        )
        return recorded
