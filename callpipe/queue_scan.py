"""Read a whole queue once, safely: hold every message, act on some, give the rest back.

AMQP cannot look at a queue without taking its messages out, so a scan takes them all (a
consumer with the largest prefetch, then `basic.get` past it) and holds them unacked:

- a message forwarded elsewhere is acked only after the broker confirmed its copy;
- a message dropped (purge) is acked at once, and only those selected;
- every other message is given back with `nack(requeue)` at the end, one by one in the
  order they were read, so they return in that order (RabbitMQ 3.x puts them behind any
  that arrived during the scan; the relative order of the ones read is kept).

A connection lost half-way returns whatever is unacked: nothing is lost, and a copy that was
confirmed but whose original could not be acked exists twice (ids dedupe downstream).

Returning a message raises a quorum queue's delivery count on RabbitMQ before 4.3. A message
read `REFRESH_AT` times is therefore copied to the queue's tail (confirmed) and the original
acked, instead of returned: no number of reads can bring it to a delivery limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from callpipe.letters import Letter, without
from infra.confirmed_publisher import ConfirmedPublisher, PublishFailedError
from schemas.topology import HEADER_ROUTING_KEY

log = logging.getLogger(__name__)

PREFETCH_MAX = 65535  # AMQP's largest prefetch count
IDLE_S = 2.0  # no delivery for this long: the rest of the queue went to someone else
REFRESH_AT = 10  # below RabbitMQ 4's default delivery limit (20) and ours
IN_FLIGHT = 128  # forwarded copies awaiting their confirms
SETTLED_WAIT_S = 5.0  # for returned messages to be counted in the queue again
BROKER_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})


class QueueNotFoundError(Exception):
    """The queue to read does not exist."""


@dataclass(frozen=True)
class Target:
    """Where a forwarded copy goes."""

    exchange: str
    routing_key: str
    message_id: str
    headers: dict[str, Any]


@dataclass
class ScanResult:
    read: int = 0
    forwarded: list[str] = field(default_factory=list)  # letter ids
    dropped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (letter id, why)
    refreshed: int = 0
    returned: int = 0


def _letter(message: DeliveredMessage) -> Letter:
    properties = message.header.properties
    delivery = message.delivery
    assert isinstance(delivery, Basic.Deliver | Basic.GetOk)
    return Letter(
        body=message.body,
        routing_key=delivery.routing_key or "",
        message_id=properties.message_id or "",
        headers=dict(properties.headers or {}),
        delivery_tag=delivery.delivery_tag or 0,
    )


class QueueScan:
    """`async with QueueScan(...) as scan: await scan.each(handle)`; `handle` may call
    `forward` or `drop` on the letter it is given; anything else goes back at the end."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        queue: str,
        *,
        timeout_s: float,
        prefetch: int = PREFETCH_MAX,
    ) -> None:
        self.queue = queue
        self._prefetch = prefetch
        self.expected = 0
        self.result = ScanResult()
        self._connection = connection
        self._timeout_s = timeout_s
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self._consumer_tag: str | None = None
        self._unsettled: set[int] = set()  # delivered, neither acked nor given back
        self._claimed: set[int] = set()  # forwarded or dropped by the handler
        self._copies: set[asyncio.Task[None]] = set()
        self._room = asyncio.Semaphore(IN_FLIGHT)

    async def __aenter__(self) -> QueueScan:
        await self._connection.ready()
        transport = self._connection.transport
        if transport is None:
            raise ConnectionError("not connected to the broker")
        # A plain channel, not a robust one: after a reconnect it must not consume again.
        channel = await transport.connection.channel()
        self._channel = channel
        try:
            declared = await channel.queue_declare(self.queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise QueueNotFoundError(f"queue {self.queue!r} does not exist") from exc
        self.expected = declared.message_count or 0
        await channel.basic_qos(prefetch_count=self._prefetch)
        self._publisher = await ConfirmedPublisher.open(self._connection, self._timeout_s)
        return self

    async def each(self, handle: Callable[[Letter], Awaitable[None]]) -> None:
        """Call `handle` on each message that was in the queue when the scan began, in queue
        order, once. Any that arrived since are only held and given back: a requeued message
        that dies again at once is not requeued twice by one command."""
        channel = self._require_channel()
        if self.expected == 0:
            return
        consume = await channel.basic_consume(self.queue, self._on_delivery, no_ack=False)
        self._consumer_tag = consume.consumer_tag
        while self.result.read < min(self.expected, self._prefetch):
            try:
                delivered = await asyncio.wait_for(self._inbox.get(), timeout=IDLE_S)
            except TimeoutError:
                break
            await self._handle(delivered, handle)
        await self._cancel_consumer()
        while not self._inbox.empty():  # sent before the cancel took effect
            delivered = self._inbox.get_nowait()
            if self.result.read < self.expected:
                await self._handle(delivered, handle)
        while self.result.read < self.expected:  # past the largest prefetch
            got = await channel.basic_get(self.queue, no_ack=False)
            if not isinstance(got.delivery, Basic.GetOk):
                break
            self._unsettled.add(got.delivery.delivery_tag or 0)
            await self._handle(got, handle)

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        assert isinstance(message.delivery, Basic.Deliver)
        self._unsettled.add(message.delivery.delivery_tag or 0)
        self._inbox.put_nowait(message)

    async def _handle(
        self, delivered: DeliveredMessage, handle: Callable[[Letter], Awaitable[None]]
    ) -> None:
        self.result.read += 1
        letter = _letter(delivered)
        await handle(letter)
        if letter.delivery_tag not in self._claimed and letter.delivery_count >= REFRESH_AT:
            headers = without(letter.headers, BROKER_HEADERS)
            headers[HEADER_ROUTING_KEY] = letter.effective_routing_key
            target = Target("", self.queue, letter.message_id, headers)
            await self._schedule(letter, target, refresh=True)

    async def forward(self, letter: Letter, target: Target) -> None:
        """Publish a copy to `target`; ack the original once the broker confirmed the copy."""
        await self._schedule(letter, target, refresh=False)

    async def _schedule(self, letter: Letter, target: Target, *, refresh: bool) -> None:
        self._claimed.add(letter.delivery_tag)
        await self._room.acquire()
        task = asyncio.create_task(self._copy(letter, target, refresh=refresh))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _copy(self, letter: Letter, target: Target, *, refresh: bool) -> None:
        letter_id = letter.id
        try:
            assert self._publisher is not None
            await self._publisher.publish(
                target.exchange,
                target.routing_key,
                letter.body,
                message_id=target.message_id,
                headers=target.headers,
            )
        except PublishFailedError as exc:
            if refresh:
                log.warning("%s: could not refresh %s: %s", self.queue, letter_id, exc)
            else:
                self.result.failed.append((letter_id, str(exc)))
            return  # unacked: it goes back with the others
        finally:
            self._room.release()
        try:
            await self._ack(letter)
        except Exception as exc:
            # The copy is out; the original returns when the channel closes: two of it.
            self.result.failed.append((letter_id, f"copied, but the original stays: {exc!r}"))
            return
        if refresh:
            self.result.refreshed += 1
        else:
            self.result.forwarded.append(letter_id)

    async def drop(self, letter: Letter) -> None:
        """Remove a message for good (ack it)."""
        self._claimed.add(letter.delivery_tag)
        await self._ack(letter)
        self.result.dropped.append(letter.id)

    async def _ack(self, letter: Letter) -> None:
        await self._require_channel().basic_ack(letter.delivery_tag)
        self._unsettled.discard(letter.delivery_tag)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._copies:  # each has a deadline: the publisher's timeout
                await asyncio.gather(*self._copies, return_exceptions=True)
            await self._give_back()
        finally:
            if self._publisher is not None:
                await self._publisher.close()
            channel = self._channel
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _give_back(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return  # the broker has given back whatever was unacked
        await self._cancel_consumer()
        if not self._unsettled:
            return
        returned = len(self._unsettled)
        # One by one, in the order they were delivered (delivery tags count up): a single
        # `multiple` nack returns a consumer's deliveries and `basic.get`'s in two groups.
        for tag in sorted(self._unsettled):
            await channel.basic_nack(tag, requeue=True)
        self._unsettled.clear()
        self.result.returned = returned
        await self._wait_counted(channel, returned)

    async def _wait_counted(self, channel: aiormq.abc.AbstractChannel, returned: int) -> None:
        """Returns are applied asynchronously: wait (briefly) until the queue counts them, so
        that the next command finds them."""
        deadline = time.monotonic() + SETTLED_WAIT_S
        while time.monotonic() < deadline:
            declared = await channel.queue_declare(self.queue, passive=True)
            if (declared.message_count or 0) >= returned:
                return
            await asyncio.sleep(0.05)
        log.warning("%s: %d returned messages not counted yet", self.queue, returned)

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        channel = self._channel
        if tag is not None and channel is not None and not channel.is_closed:
            await channel.basic_cancel(tag)

    def _require_channel(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None:
            raise RuntimeError("QueueScan used outside `async with`")
        return self._channel
