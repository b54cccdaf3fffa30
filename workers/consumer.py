"""The consume loop: one place decides ack, retry or dead-letter for every delivery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from callpipe.broker import ConfirmedPublisher, PublishFailedError, plain_headers
from schemas import codec
from schemas.topology import HEADER_ERROR, Kind, Topology
from workers.delivery import decode_delivery
from workers.errors import (
    Action,
    PermanentError,
    RetryPolicy,
    TransientError,
    backoff_delay,
    decide,
)
from workers.events import routing_key_of
from workers.failpoints import failpoint
from workers.metrics import KindMetrics
from workers.pipeline import Pipeline
from workers.storage import Recorded

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 3.0


class AmqpEventPublisher:
    """Events go to `{ns}.events`; no subscriber yet is fine, so not mandatory."""

    def __init__(self, publisher: ConfirmedPublisher, topology: Topology) -> None:
        self._publisher = publisher
        self._topology = topology

    async def publish_event(self, event: dict[str, Any]) -> None:
        try:
            await self._publisher.publish(
                self._topology.events_exchange,
                routing_key_of(event),
                codec.dumps(event),
                message_id=str(event["event_id"]),
                mandatory=False,
            )
        except PublishFailedError as exc:
            raise TransientError(f"event not confirmed: {exc}") from exc

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
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


class CallConsumer:
    """Consumes one call queue, up to `prefetch` deliveries at a time."""

    def __init__(
        self,
        queue: AbstractQueue,
        kind: Kind,
        pipeline: Pipeline,
        publisher: AmqpEventPublisher,
        policy: RetryPolicy,
        metrics: KindMetrics,
    ) -> None:
        self._queue = queue
        self._kind = kind
        self._pipeline = pipeline
        self._publisher = publisher
        self._policy = policy
        self._metrics = metrics
        self._consuming = False
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._random = random.Random()

    async def run(self, stop: asyncio.Event, shutdown_timeout_s: float) -> None:
        """Consume until `stop` is set, then finish (and ack) what is in flight."""
        tag = await self._queue.consume(self._on_message)
        self._consuming = True
        log.info("worker %s consuming %s", self._kind, self._queue.name)
        await stop.wait()
        self._stopping.set()
        self._consuming = False
        try:
            # Cancelling waits for the channel; while the broker is away that would be forever.
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await self._queue.cancel(tag)
        except Exception as exc:  # the broker is gone: its unacked deliveries return anyway
            log.warning("worker %s could not cancel its consumer: %r", self._kind, exc)
        if self._in_flight:
            log.info(
                "worker %s finishing %d in-flight deliveries", self._kind, len(self._in_flight)
            )
            await asyncio.wait(set(self._in_flight), timeout=shutdown_timeout_s)

    @property
    def not_consuming(self) -> str | None:
        """Why this consumer takes no deliveries now (None: it does)."""
        if not self._consuming:
            return "stopping" if self._stopping.is_set() else "not consuming yet"
        if self._queue.channel.is_closed:
            return "consume channel closed (broker unreachable)"
        return None

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A dropped channel cancels aio-pika's task for this delivery. The work must not stop
        # between the event's confirm and the commit (it would be published again on the
        # redelivery): it runs in a task of ours, and only its ack may then fail (stale tag).
        task = asyncio.create_task(self._tracked(message))
        self._in_flight.add(task)
        await asyncio.shield(task)

    async def _tracked(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._metrics.in_flight.take(task)
        started = time.monotonic()
        try:
            await self._handle(message)
        finally:
            self._in_flight.discard(task)
            self._metrics.in_flight.settle(task)
            self._metrics.processing_seconds.observe(time.monotonic() - started)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        failures = unexpected = 0
        while True:
            error: Exception | None = None
            recorded: Recorded | None = None
            try:
                webhook = decode_delivery(message.body, plain_headers(message.headers), self._kind)
                recorded = await self._pipeline.process(webhook)
            except Exception as exc:
                error = exc
                failures += 1
                if not isinstance(exc, TransientError | PermanentError):
                    unexpected += 1
            action = decide(error, unexpected, self._policy)
            if action is Action.DEAD_LETTER and error is not None:
                action = await self._dead_letter(message, error)
            if action is Action.ACK:
                failpoint("consumer.before_ack", message.message_id or "")
                await _settle(message.ack())
                self._count_ack(recorded)
                return
            self._metrics.retries.inc()
            log.warning(
                "delivery %s failed (attempt %d), retrying: %s",
                message.message_id,
                failures,
                error,
                exc_info=not isinstance(error, TransientError),
            )
            if self._stopping.is_set():
                # Shutting down: hand it back to the broker for another worker.
                await _settle(message.nack(requeue=True))
                return
            delay = backoff_delay(failures, self._policy, self._random)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    def _count_ack(self, recorded: Recorded | None) -> None:
        """An ack follows a stored webhook, a duplicate, or (nothing recorded) a dead letter."""
        if recorded is None:
            self._metrics.dead_lettered.inc()
        elif recorded.stored:
            self._metrics.processed.inc()
        else:
            self._metrics.duplicates.inc()

    async def _dead_letter(self, message: AbstractIncomingMessage, error: Exception) -> Action:
        reason = f"{type(error).__name__}: {error}"
        try:
            await self._publisher.dead_letter(message, reason)
        except TransientError:
            return Action.RETRY
        log.error("delivery %s dead-lettered: %s", message.message_id, reason)
        return Action.ACK


async def _settle(settlement: Any) -> None:
    """Ack or nack; after a reconnect the delivery tag is stale and the broker redelivers."""
    try:
        await settlement
    except Exception as exc:
        log.warning("could not settle delivery (the broker will redeliver it): %s", exc)
