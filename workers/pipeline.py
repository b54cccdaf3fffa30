"""A batch of webhooks through a worker: enrich each → store them once, with their events."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from infra.masking import mask_phone
from workers.delivery import ReceivedWebhook
from workers.enrich import enrich
from workers.events import render_outbox
from workers.storage import CallStore, StoredBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pipeline:
    store: CallStore
    region: str
    tz: ZoneInfo

    async def process(self, webhooks: Sequence[ReceivedWebhook]) -> StoredBatch:
        """Store the batch in one transaction; its events are in the result, to publish."""
        items = [
            (webhook, enrich(webhook.payload, region=self.region, tz=self.tz))
            for webhook in webhooks
        ]
        stored = await self.store.record(items, render_outbox)
        for (webhook, call), recorded in zip(items, stored.recorded, strict=True):
            # One line per duplicate (rare, and worth seeing); stored calls are counted in
            # /metrics, and logged one by one at DEBUG.
            level = logging.DEBUG if recorded.stored else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "call %s %s from %s: %s",
                    webhook.event_id,
                    call.outcome or "started",
                    mask_phone(call.caller),
                    "stored" if recorded.stored else "duplicate",
                )
        return stored
