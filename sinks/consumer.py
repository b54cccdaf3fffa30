"""Consume one sink's queue: deliver, then ack, delay or dead-letter, decided in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from infra.broker import plain_headers
from infra.confirmed_publisher import ConfirmedPublisher, PublishFailedError
from schemas import codec
from schemas.topology import (
    HEADER_ATTEMPT,
    HEADER_ERROR,
    HEADER_ROUTING_KEY,
    HEADER_SINK,
    Topology,
    routing_key_of,
)
from sinks.config import SinkConfig
from sinks.port import DeliveryResult, Done, Event, GiveUp, RetryLater, Sink
from sinks.retry import Ack, DeadLetter, Delay, SinkAction, next_action
from sinks.topology import delay_queue

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 3.0
MAX_PAUSE_S = 60.0  # the longest a destination's "slow down" holds the whole sink
# An event the broker cannot take yet (its delay queue is gone, `{ns}.dead` is full, an
# alarm blocks publishing) is held and its settling tried again: the wait between tries
# doubles up to a minute. A try whose confirm does not come may still be stored once the
# broker reads on (an alarm ends), so the tries after the first wait for their confirm as
# long as their channel lives (an hour at most), instead of sending another copy: a copy per
# channel, not one per try. A stop ends such a wait at once (the delivery stays unsettled).
SETTLE_RETRY_S = 1.0
SETTLE_RETRY_MAX_S = 60.0
SETTLE_PATIENCE_S = 3600.0
SETTLE_WARN_EVERY_S = 60.0  # a held event is logged when first held, then at most this often


def decode_event(message: AbstractIncomingMessage) -> Event | GiveUp:
    """The event in a sink's delivery, or why it cannot be one."""
    headers = plain_headers(message.headers)
    try:
        envelope = codec.loads(message.body)
    except ValueError:
        return GiveUp("not JSON: not an event")
    if not isinstance(envelope, dict) or not envelope.get("event_id"):
        return GiveUp("not an event envelope (no event_id)")
    routing_key = headers.get(HEADER_ROUTING_KEY) or message.routing_key or ""
    return Event(message.body, envelope, routing_key)


def attempt_of(message: AbstractIncomingMessage) -> int:
    try:
        return max(int(plain_headers(message.headers).get(HEADER_ATTEMPT, "1")), 1)
    except ValueError:
        return 1


class SinkConsumer:
    def __init__(
        self,
        config: SinkConfig,
        sink: Sink,
        queue: AbstractQueue,
        publisher: ConfirmedPublisher,
        topology: Topology,
    ) -> None:
        self._config = config
        self._sink = sink
        self._queue = queue
        self._publisher = publisher
        self._topology = topology
        self._in_flight: set[asyncio.Task[None]] = set()
        self._resume_at = 0.0
        self._stopping = asyncio.Event()
        self._shielded: set[asyncio.Future[DeliveryResult]] = set()

    async def run(self, stop: asyncio.Event, shutdown_timeout_s: float) -> None:
        """Consume until `stop`, then let in-flight deliveries finish."""
        tag = await self._queue.consume(self._on_message)
        log.info("sink %s consuming %s", self._config.name, self._queue.name)
        await stop.wait()
        self._stopping.set()
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await self._queue.cancel(tag)
        except Exception as exc:  # the broker is gone: unacked deliveries return anyway
            log.warning("sink %s could not cancel its consumer: %r", self._config.name, exc)
        pending: set[asyncio.Future[Any]] = {*self._in_flight, *self._shielded}
        if pending:
            await asyncio.wait(pending, timeout=shutdown_timeout_s)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await self._handle(message)
        finally:
            self._in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        attempt = attempt_of(message)
        event = decode_event(message)
        if isinstance(event, GiveUp):
            result: DeliveryResult = event
        else:
            if not await self._paused():
                return  # stopping: unsettled, the broker hands it out again later
            # A dropped channel cancels this task; the delivery itself must not be cut off
            # between "sent" and "noted as sent". Its redelivery then finds it done.
            delivering = asyncio.ensure_future(self._deliver(event))
            self._shielded.add(delivering)
            delivering.add_done_callback(self._shielded.discard)
            result = await asyncio.shield(delivering)
        action = next_action(result, attempt, self._config.schedule)
        await self._settle_patiently(message, action)

    async def _settle_patiently(self, message: AbstractIncomingMessage, action: SinkAction) -> None:
        """Settle, holding the delivery while the broker cannot take it (unsettled, it stays
        with the broker, and returns if we go); see SETTLE_PATIENCE_S."""
        name, event_id = self._config.name, message.message_id
        try:
            await self._settle(message, action, self._publisher.timeout_s)
            return
        except PublishFailedError as exc:
            log.warning("sink %s cannot settle %s yet: %s; held, tried again", name, event_id, exc)
            failure = exc
        retry_s, tries, warned_at = SETTLE_RETRY_S, 1, time.monotonic()
        while True:
            log.debug("sink %s: settling %s failed (try %d): %s", name, event_id, tries, failure)
            if not await self._waited(retry_s):
                return
            log.debug(
                "sink %s: settling %s again (try %d), waiting up to %gs for its confirm",
                name, event_id, tries + 1, SETTLE_PATIENCE_S,
            )  # fmt: skip
            settling = asyncio.ensure_future(self._settle(message, action, SETTLE_PATIENCE_S))
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({settling, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not settling.done():  # stopping: the delivery stays unsettled
                settling.cancel()
                with contextlib.suppress(BaseException):
                    await settling
                return
            try:
                settling.result()
            except PublishFailedError as exc:
                tries, failure = tries + 1, exc
                if time.monotonic() - warned_at >= SETTLE_WARN_EVERY_S:
                    warned_at = time.monotonic()
                    log.warning(
                        "sink %s still cannot settle %s (%d tries): %s",
                        name, event_id, tries, exc,
                    )  # fmt: skip
                retry_s = min(retry_s * 2, SETTLE_RETRY_MAX_S)
                continue
            log.info("sink %s settled %s after %d failed tries", name, event_id, tries)
            return

    async def _waited(self, seconds: float) -> bool:
        """Wait that long; False if the sink stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return not self._stopping.is_set()

    async def _deliver(self, event: Event) -> DeliveryResult:
        # The routing key of the event itself, whichever way it came.
        if not self._config.wants(event.project, routing_key_of(event.envelope)):
            return Done()
        try:
            result = await self._sink.deliver(event)
        except Exception as exc:
            log.exception("sink %s failed on %s", self._config.name, event.event_id)
            return RetryLater(f"unexpected {type(exc).__name__}")
        if isinstance(result, RetryLater) and result.after_s:
            # The destination asked everyone to slow down, not just this event.
            self._resume_at = max(
                self._resume_at, time.monotonic() + min(result.after_s, MAX_PAUSE_S)
            )
        return result

    async def _paused(self) -> bool:
        """Wait out a destination's "slow down"; False if the sink stops meanwhile."""
        return await self._waited(max(self._resume_at - time.monotonic(), 0.0))

    async def _settle(
        self, message: AbstractIncomingMessage, action: SinkAction, timeout_s: float
    ) -> None:
        if isinstance(action, Delay):
            await self._publisher.publish(
                "",
                delay_queue(self._topology, self._config.name, action.delay_s),
                message.body,
                message_id=message.message_id or "",
                headers=self._headers(message, {HEADER_ATTEMPT: action.attempt}),
                timeout_s=timeout_s,
            )
            log.warning(
                "sink %s: %s failed (attempt %d: %s), retrying in %gs",
                self._config.name,
                message.message_id,
                action.attempt - 1,
                action.reason,
                action.delay_s,
            )
        elif isinstance(action, DeadLetter):
            await self._publisher.publish(
                self._topology.dead_exchange,
                self._routing_key(message),
                message.body,
                message_id=message.message_id or "",
                headers=self._headers(
                    message, {HEADER_ERROR: action.reason[:1000], HEADER_SINK: self._config.name}
                ),
                timeout_s=timeout_s,
            )
            log.error(
                "sink %s: %s dead-lettered: %s",
                self._config.name,
                message.message_id,
                action.reason,
            )
        else:
            assert isinstance(action, Ack)
        with contextlib.suppress(Exception):  # a stale tag after a reconnect: redelivered
            await message.ack()

    def _routing_key(self, message: AbstractIncomingMessage) -> str:
        return plain_headers(message.headers).get(HEADER_ROUTING_KEY) or message.routing_key or ""

    def _headers(
        self, message: AbstractIncomingMessage, extra: dict[str, object]
    ) -> dict[str, object]:
        """Our own headers only: the broker's x-death history would grow with every retry."""
        kept = {
            key: value
            for key, value in plain_headers(message.headers).items()
            if key.startswith("x-callpipe-")
        }
        return {**kept, HEADER_ROUTING_KEY: self._routing_key(message), **extra}
