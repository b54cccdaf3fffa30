"""The consume loop: deliveries are stored in batches, and one place decides ack, retry or
dead-letter for each.

Batches form by themselves: a batch takes every delivery that is waiting (up to `batch_max`)
when a slot frees up, so a quiet queue is stored one webhook at a time with no added wait,
and a busy one in batches as large as the load makes them. Two batches run at once: one is
in the database while the next one gathers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence

import aiormq

from infra.broker import plain_headers
from infra.direct_consumer import Delivery, DirectConsumer
from schemas.topology import Kind
from workers.acks import AckWindow, Release
from workers.batch import halves
from workers.delivery import ReceivedWebhook, decode_delivery
from workers.errors import (
    Action,
    PermanentError,
    RetryPolicy,
    TransientError,
    backoff_delay,
    decide,
)
from workers.failpoints import failpoint
from workers.metrics import KindMetrics
from workers.outbox import OutboxRelay
from workers.pipeline import Pipeline
from workers.publishing import AmqpEventPublisher

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 3.0
PARALLEL_BATCHES = 2

Item = tuple[Delivery, ReceivedWebhook]


class CallConsumer:
    """Consumes one call queue: up to `prefetch` deliveries held, stored in batches."""

    def __init__(
        self,
        source: DirectConsumer,
        kind: Kind,
        pipeline: Pipeline,
        publisher: AmqpEventPublisher,
        relay: OutboxRelay,
        policy: RetryPolicy,
        metrics: KindMetrics,
        batch_max: int,
    ) -> None:
        self._source = source
        self._kind = kind
        self._pipeline = pipeline
        self._publisher = publisher
        self._relay = relay
        self._policy = policy
        self._metrics = metrics
        self._batch_max = max(1, batch_max)
        self._consuming = False
        self._stopping = asyncio.Event()
        self._waiting: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()
        self._random = random.Random()
        # Acks of committed deliveries go out as one `multiple` ack per run (workers/acks.py),
        # on the channel the current deliveries came on; a reconnect starts a new window.
        self._acks = AckWindow()
        self._acks_channel: aiormq.abc.AbstractChannel | None = None
        # Acks leave in the order the window releases them: a `multiple` ack that overtook a
        # lower one would make the broker close the channel over an unknown delivery tag.
        self._acking = asyncio.Lock()

    async def run(self, stop: asyncio.Event, shutdown_timeout_s: float) -> None:
        """Consume until `stop` is set, then finish (and ack) what is held."""
        dispatching = asyncio.create_task(self._dispatch(), name=f"batches-{self._kind}")
        try:
            await self._source.start(self._on_message)
            self._consuming = True
            log.info("worker %s consuming %s", self._kind, self._source.queue)
            await stop.wait()
            self._stopping.set()
            self._consuming = False
            try:
                # Cancelling waits for the channel; while the broker is away that is forever.
                await self._source.stop(CANCEL_TIMEOUT_S)
            except Exception as exc:  # the broker is gone: its unacked deliveries return anyway
                log.warning("worker %s could not cancel its consumer: %r", self._kind, exc)
            held = len(self._metrics.in_flight.taken_at)  # waiting ones included
            if held:
                log.info("worker %s finishing %d held deliveries", self._kind, held)
            self._arrived.set()
            await asyncio.wait({dispatching}, timeout=shutdown_timeout_s)
        finally:
            dispatching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatching

    @property
    def not_consuming(self) -> str | None:
        """Why this consumer takes no deliveries now (None: it does)."""
        if not self._consuming:
            return "stopping" if self._stopping.is_set() else "not consuming yet"
        return self._source.not_consuming

    def _on_message(self, message: Delivery) -> None:
        # Only queued here: the work runs in tasks of ours, so a dropped channel (which cancels
        # aiormq's delivery tasks) cannot cut a batch between its commit and its acks.
        self._metrics.in_flight.take(message)
        channel = _channel_of(message)
        if channel is not self._acks_channel:
            self._acks, self._acks_channel = AckWindow(), channel
        self._acks.delivered(message.delivery_tag)
        self._waiting.append(message)
        self._arrived.set()

    async def _dispatch(self) -> None:
        """Start a batch of everything waiting whenever a slot is free; after a stop, finish
        what is held and return."""
        slots = asyncio.Semaphore(PARALLEL_BATCHES)
        while True:
            if not self._waiting:
                if self._stopping.is_set():
                    break
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await slots.acquire()
            count = min(len(self._waiting), self._batch_max)
            batch = [self._waiting.popleft() for _ in range(count)]
            task = asyncio.create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            task.add_done_callback(lambda _: slots.release())
        if self._batches:
            await asyncio.wait(set(self._batches))

    async def _run_batch(self, messages: list[Delivery]) -> None:
        items: list[Item] = []
        for message in messages:
            try:
                items.append(
                    (
                        message,
                        decode_delivery(message.body, plain_headers(message.headers), self._kind),
                    )
                )
            except PermanentError as exc:
                await self._give_up(message, exc)
        if items:
            await self._store(items)

    async def _store(self, items: Sequence[Item]) -> None:
        """Store a batch; a transient failure retries it whole, any other failure splits it
        until the delivery that fails is alone, and that one is retried or dead-lettered."""
        failures = unexpected = 0
        while True:
            try:
                stored = await self._pipeline.process([webhook for _, webhook in items])
            except Exception as exc:
                failures += 1
                if not isinstance(exc, TransientError) and len(items) > 1:
                    first, second = halves(items)
                    log.warning(
                        "a batch of %d failed (%s: %s); storing it in halves",
                        len(items),
                        type(exc).__name__,
                        exc,
                    )
                    await self._store(first)
                    await self._store(second)
                    return
                if not isinstance(exc, TransientError | PermanentError):
                    unexpected += 1
                action = decide(exc, unexpected, self._policy)
                if action is Action.DEAD_LETTER:
                    await self._give_up(items[0][0], exc)
                    return
                if not await self._wait_to_retry(items, failures, exc):
                    return
                continue
            self._relay.hand_over(stored.events)
            failpoint("consumer.before_ack", ",".join(webhook.event_id for _, webhook in items))
            await self._ack([message for message, _ in items])
            for recorded in stored.recorded:
                (self._metrics.processed if recorded.stored else self._metrics.duplicates).inc()
            return

    async def _wait_to_retry(self, items: Sequence[Item], failures: int, error: Exception) -> bool:
        """Back off before the next attempt; False (the deliveries handed back) when stopping."""
        self._metrics.retries.inc(len(items))
        log.warning(
            "%s failed (attempt %d), retrying: %s",
            f"delivery {items[0][1].event_id}" if len(items) == 1 else f"a batch of {len(items)}",
            failures,
            error,
            exc_info=not isinstance(error, TransientError),
        )
        if self._stopping.is_set():
            # Shutting down: hand them back to the broker for another worker.
            for message, _ in items:
                await self._hand_back(message)
            return False
        await self._back_off(failures, [message for message, _ in items])
        return True

    async def _back_off(self, failures: int, messages: Sequence[Delivery]) -> None:
        """Wait before the next attempt; a stop cuts the wait short. Meanwhile the deliveries
        after these are acked without waiting for them."""
        tags = self._tags_in_window(messages)
        async with self._acking:
            await self._send_acks(self._acks.retrying(tags))
        delay = backoff_delay(failures, self._policy, self._random)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        finally:
            self._acks.resumed(tags)

    async def _give_up(self, message: Delivery, error: Exception) -> None:
        """Keep a delivery that can never be stored in `{ns}.dead`, then ack it; while the
        dead letter is not confirmed, keep trying (or hand it back when stopping)."""
        reason = f"{type(error).__name__}: {error}"
        failures = 0
        while True:
            try:
                await self._publisher.dead_letter(message, reason)
                break
            except TransientError as exc:
                failures += 1
                self._metrics.retries.inc()
                log.warning(
                    "delivery %s not dead-lettered (%s), retrying: %s",
                    message.message_id,
                    exc,
                    error,
                )
                if self._stopping.is_set():
                    await self._hand_back(message)
                    return
                await self._back_off(failures, [message])
        log.error("delivery %s dead-lettered: %s", message.message_id, reason)
        await self._ack([message])
        self._metrics.dead_lettered.inc()

    async def _ack(self, messages: Sequence[Delivery]) -> None:
        """Ack deliveries whose work is done: those of the current channel through the window,
        any from an earlier channel alone (the broker redelivers those anyway)."""
        for message in messages:
            self._count_settled(message)
        tags = self._tags_in_window(messages)
        async with self._acking:
            await self._send_acks(self._acks.ready(tags))
        if len(tags) < len(messages):
            for message in messages:
                if not self._in_window(message):
                    await self._settle_alone(message, ack=True)

    async def _hand_back(self, message: Delivery) -> None:
        """Nack first: until the window knows it settled, no `multiple` ack can pass it (an
        ack past it before the nack would ack it, and the nack would then close the channel)."""
        self._count_settled(message)
        await self._settle_alone(message, ack=False)
        if self._in_window(message):
            tags = self._tags_in_window([message])
            async with self._acking:
                await self._send_acks(self._acks.settled_alone(tags))

    def _in_window(self, message: Delivery) -> bool:
        return _channel_of(message) is self._acks_channel

    def _tags_in_window(self, messages: Sequence[Delivery]) -> list[int]:
        return [m.delivery_tag for m in messages if _channel_of(m) is self._acks_channel]

    async def _send_acks(self, release: Release) -> None:
        if release.multiple_up_to is None and not release.alone:
            return
        channel = self._acks_channel
        try:
            if channel is None:
                raise aiormq.exceptions.ChannelInvalidStateError("no channel")
            if release.multiple_up_to is not None:
                await channel.basic_ack(release.multiple_up_to, multiple=True)
            for tag in release.alone:
                await channel.basic_ack(tag)
        except Exception as exc:
            log.warning("could not ack deliveries (the broker will redeliver them): %s", exc)

    def _count_settled(self, message: Delivery) -> None:
        taken_at = self._metrics.in_flight.taken_at.get(message)
        self._metrics.in_flight.settle(message)
        if taken_at is not None:
            self._metrics.processing_seconds.observe(time.monotonic() - taken_at)

    @staticmethod
    async def _settle_alone(message: Delivery, *, ack: bool) -> None:
        """Ack, or hand back, one delivery; after a reconnect the delivery tag is stale and
        the broker redelivers anyway."""
        try:
            await (message.ack() if ack else message.nack(requeue=True))
        except Exception as exc:
            log.warning("could not settle delivery (the broker will redeliver it): %s", exc)


def _channel_of(message: Delivery) -> aiormq.abc.AbstractChannel | None:
    """The protocol channel a delivery came on (None once that channel is closed)."""
    return None if message.channel.is_closed else message.channel
