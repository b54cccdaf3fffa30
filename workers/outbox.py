"""The outbox relay: publish the events that storage committed, then mark them published.

Storage writes each event into `call_events.event` in the transaction that stores its webhook
(the outbox), so no transaction waits for the broker. The relay then publishes:

- *fresh* events, handed over by this process right after their commit, in batches whose
  confirms are awaited together (pipelined on one confirm channel);
- *left-over* events (a worker died between its commit and its publish, or the broker was
  away), found by a periodic sweep of the unpublished rows older than a few seconds.

Either way a relay marks its events published (`FOR UPDATE SKIP LOCKED`) before it publishes
them, unmarks the ones the broker did not confirm, and commits after the confirms: until
then the rows stay locked and the marks unseen, so two relays never send the same event. An
event goes out twice only when a relay dies, or loses the database, between the broker's
confirm and that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from workers.events import OutboxEvent, stored_to_outbox
from workers.failpoints import failpoint
from workers.metrics import KindMetrics
from workers.storage import DATABASE_TROUBLE

log = logging.getLogger(__name__)

# A relay takes its events by marking them published before it publishes them, in the
# transaction it commits after their confirms: until that commit no one else sees the mark,
# and the rows stay locked, so two relays never send the same event. SKIP LOCKED: an event a
# sweep is sending now is left to the sweep.
MARK_FRESH = """
UPDATE call_events SET published_at = clock_timestamp()
WHERE event_id IN (
    SELECT event_id FROM call_events
    WHERE event_id = ANY($1::text[]) AND published_at IS NULL
    FOR UPDATE SKIP LOCKED
)
RETURNING event_id
"""

# Served by the partial index `call_events_unpublished` (0001): it holds only unpublished rows.
MARK_LEFT_OVER = """
UPDATE call_events SET published_at = clock_timestamp()
WHERE event_id IN (
    SELECT event_id FROM call_events
    WHERE published_at IS NULL AND event IS NOT NULL
      AND processed_at < now() - make_interval(secs => $1::float8)
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING event_id, event, received_at
"""

# The events the broker did not confirm go back to unpublished, in the same transaction.
UNMARK = """
UPDATE call_events SET published_at = NULL WHERE event_id = ANY($1::text[])
"""


class EventPublisher(Protocol):
    """The broker port: publish events to `{ns}.events` together and await their confirms;
    per event None (confirmed) or the `TransientError` that says why not. The confirmed
    events' ids go to `confirmed` as they are known, also when the caller is cancelled."""

    async def publish_all(
        self, events: Sequence[OutboxEvent], confirmed: list[str]
    ) -> Sequence[Exception | None]: ...


@dataclass(frozen=True)
class RelaySettings:
    batch_max: int = 256  # events published, and so at most published twice, per round
    sweep_every_s: float = 2.0
    left_over_after_s: float = 5.0  # younger unpublished events are still the relay's own


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: EventPublisher,
        settings: RelaySettings,
        metrics: KindMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._settings = settings
        self._metrics = metrics
        self._pending: deque[OutboxEvent] = deque()
        self._wake = asyncio.Event()

    def hand_over(self, events: Sequence[OutboxEvent]) -> None:
        """Events just committed: publish them soon. Never blocks, never fails."""
        if events:
            self._pending.extend(events)
            self._wake.set()
            if self._metrics is not None:
                self._metrics.outbox_pending.set(len(self._pending))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self, stop: asyncio.Event, finish_timeout_s: float) -> None:
        """Publish fresh events as they come, and sweep for left-over ones beside (a slow
        sweep never delays fresh events), until `stop`; then publish what is still pending
        for up to `finish_timeout_s` (the rest stays stored and goes out with a sweep)."""
        sweeping = asyncio.create_task(self._sweep_every(stop), name="outbox-sweep")
        try:
            while not stop.is_set():
                if self._pending:
                    await self.publish_fresh()
                    continue
                self._wake.clear()
                await _first_of(self._wake, stop)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(finish_timeout_s):
                    while self._pending:
                        await self.publish_fresh()
        finally:
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping

    async def _sweep_every(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception:  # a bug must not end the sweeping: left-overs would stay
                log.exception("outbox sweep failed; retried at the next sweep")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.sweep_every_s):
                    await stop.wait()

    async def publish_fresh(self) -> None:
        """Publish up to a batch of the events handed over."""
        count = min(len(self._pending), self._settings.batch_max)
        batch = [self._pending.popleft() for _ in range(count)]
        if self._metrics is not None:
            self._metrics.outbox_pending.set(len(self._pending))
        confirmed: list[str] = []
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                marked = await conn.fetch(MARK_FRESH, [event.event_id for event in batch])
                mine = {row["event_id"] for row in marked}
                events = [e for e in batch if e.event_id in mine]
                await self._publish_marked(conn, events, confirmed)
        except DATABASE_TROUBLE as exc:
            _warn_not_marked(confirmed)
            log.warning(
                "could not publish %d events now (%r); they stay in the outbox", len(batch), exc
            )
            return
        except BaseException:  # cancelled at a stop: the same may hold for what was confirmed
            _warn_not_marked(confirmed)
            raise
        self._count_published(confirmed)

    async def sweep(self) -> int:
        """Publish every left-over event, a batch at a time; the number published."""
        published = 0
        while True:
            confirmed: list[str] = []
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(
                        MARK_LEFT_OVER,
                        self._settings.left_over_after_s,
                        self._settings.batch_max,
                    )
                    rows = sorted(rows, key=lambda row: row["received_at"])  # oldest first
                    events = [stored_to_outbox(row["event_id"], row["event"]) for row in rows]
                    if events:
                        log.info("publishing %d events left in the outbox", len(events))
                    await self._publish_marked(conn, events, confirmed)
            except DATABASE_TROUBLE as exc:
                _warn_not_marked(confirmed)
                log.warning("outbox sweep failed (%r); retried at the next sweep", exc)
                return published
            except BaseException:
                _warn_not_marked(confirmed)
                raise
            self._count_published(confirmed)
            published += len(confirmed)
            if len(rows) < self._settings.batch_max or len(confirmed) < len(rows):
                return published

    async def _publish_marked(
        self,
        conn: asyncpg.pool.PoolConnectionProxy,
        events: list[OutboxEvent],
        confirmed: list[str],
    ) -> None:
        """Publish `events` (marked published in `conn`'s transaction) with pipelined
        confirms and unmark the ones not confirmed. The confirmed ids go to `confirmed`: if
        the unmark or the commit fails, or the relay is cancelled while it waits for the
        confirms, the caller names them (they will go out again)."""
        if not events:
            return
        results = await self._publisher.publish_all(events, confirmed)
        failed: list[str] = []
        for event, result in zip(events, results, strict=True):
            if result is not None:
                failed.append(event.event_id)
                # A lost confirm may hide a stored message: the retry may send it twice.
                log.warning(
                    "event %s not confirmed (%s); it stays in the outbox", event.event_id, result
                )
        if confirmed:
            failpoint("outbox.after_confirm", ",".join(confirmed))
        if failed:
            await conn.execute(UNMARK, failed)

    def _count_published(self, event_ids: list[str]) -> None:
        if self._metrics is not None and event_ids:
            self._metrics.events_published.inc(len(event_ids))


def _warn_not_marked(event_ids: list[str]) -> None:
    """Confirmed by the broker, but their mark was not committed: the sweep sends them again."""
    for event_id in event_ids:
        log.warning("event %s published, not marked: it will go out again", event_id)


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
