"""The workers' side of the broker: events to `{ns}.events`, dead letters to `{ns}.dead`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infra.confirmed_publisher import ConfirmedPublisher, Publication, PublishFailedError
from infra.direct_consumer import Delivery
from schemas.topology import HEADER_ERROR, Topology
from workers.errors import TransientError
from workers.events import OutboxEvent, stored_to_outbox


class AmqpEventPublisher:
    """Events go to `{ns}.events`; no subscriber yet is fine, so not mandatory."""

    def __init__(self, publisher: ConfirmedPublisher, topology: Topology) -> None:
        self._publisher = publisher
        self._topology = topology

    async def publish_stored(self, event: OutboxEvent) -> None:
        """Publish an event from the outbox and await its confirm, or raise `TransientError`."""
        try:
            await self._publisher.publish(
                self._topology.events_exchange,
                event.routing_key,
                event.body,
                message_id=event.event_id,
                mandatory=False,
            )
        except PublishFailedError as exc:
            raise TransientError(f"event not confirmed: {exc}") from exc

    async def publish_all(
        self, events: Sequence[OutboxEvent], confirmed: list[str]
    ) -> list[TransientError | None]:
        """Publish events from the outbox together; per event None (confirmed) or why not.
        The confirmed ones' ids go to `confirmed`, also when the caller is cancelled."""
        exchange = self._topology.events_exchange
        results = await self._publisher.publish_many(
            [
                Publication(exchange, e.routing_key, e.body, e.event_id, mandatory=False)
                for e in events
            ],
            confirmed=confirmed,
        )
        return [None if r is None else TransientError(f"event not confirmed: {r}") for r in results]

    async def publish_event(self, event: dict[str, Any]) -> None:
        """Publish an envelope (the stale sweep's, confirmed before its commit)."""
        await self.publish_stored(stored_to_outbox(str(event["event_id"]), event))

    async def dead_letter(self, message: Delivery, reason: str) -> None:
        """Keep a message that can never be processed in `{ns}.dead`, with the reason."""
        headers = {**(message.headers or {}), HEADER_ERROR: reason[:1000]}
        try:
            await self._publisher.publish(
                self._topology.dead_exchange,
                message.routing_key or "",
                message.body,
                message_id=message.message_id or "",
                headers=headers,
            )
        except PublishFailedError as exc:
            raise TransientError(f"dead letter not confirmed: {exc}") from exc
