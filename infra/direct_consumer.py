"""Consume a queue on the protocol channel under a robust aio-pika channel.

aio-pika turns each delivery into an `IncomingMessage` and runs the callback in a task of its
own: ~30 µs a delivery, a tenth of a worker's CPU. Here a delivery is a `Delivery` (the few
fields a consumer reads), handed to the callback straight from the connection's frame
receiver (`infra.direct_deliveries`), or, where aiormq reads the frames its own way, from the
task aiormq runs it in.

aio-pika still owns the connection. After a reconnect it reopens the channel with its
prefetch and declares its queues and bindings again; the channel's reopen callback then
consumes again. A consumer the broker cancels (its queue was deleted) declares the topology
again and consumes again, retrying until it can or is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel, HeadersType
from aiormq.abc import DeliveredMessage

from infra import direct_deliveries

log = logging.getLogger(__name__)

RESUBSCRIBE_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


@dataclass(slots=True, eq=False)
class Delivery:
    """One delivery as a consumer reads it; settled on the channel it came on."""

    body: bytes
    headers: HeadersType
    message_id: str | None
    routing_key: str
    delivery_tag: int
    channel: aiormq.abc.AbstractChannel  # the protocol channel it came on

    @classmethod
    def of(
        cls,
        channel: aiormq.abc.AbstractChannel,
        deliver: aiormq.spec.Basic.Deliver,
        properties: aiormq.spec.Basic.Properties,
        body: bytes,
    ) -> Delivery:
        return cls(
            body,
            properties.headers or {},
            properties.message_id,
            deliver.routing_key or "",
            deliver.delivery_tag or 0,
            channel,
        )

    async def ack(self) -> None:
        await self.channel.basic_ack(self.delivery_tag)

    async def nack(self, *, requeue: bool = True) -> None:
        await self.channel.basic_nack(self.delivery_tag, requeue=requeue)


OnDelivery = Callable[[Delivery], None]


class DirectConsumer:
    """Consumes `queue` on `channel`'s protocol channel, again after each reopen.

    `redeclare` declares the queue (and what it is bound to) again, after the broker cancelled
    the consumer; `on_delivery` must not block: it is called once per delivery.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        redeclare: Callable[[], Awaitable[object]],
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._redeclare = redeclare
        self._on_delivery: OnDelivery | None = None
        self._stopping = False
        self._consuming: tuple[aiormq.abc.AbstractChannel, str] | None = None
        self._resubscribing: asyncio.Task[None] | None = None
        self._resubscribing_because: str | None = None  # for `not_consuming`

    @property
    def queue(self) -> str:
        return self._queue

    @property
    def not_consuming(self) -> str | None:
        """Why no delivery comes now (None: they do)."""
        if self._on_delivery is None or self._stopping:
            return "not consuming"
        if self._channel.is_closed or (self._consuming and self._consuming[0].is_closed):
            return "consume channel closed (broker unreachable)"
        if self._consuming is None:
            return self._resubscribing_because or "consume channel closed (broker unreachable)"
        return None

    async def start(self, on_delivery: OnDelivery) -> None:
        """Consume from now on, and again whenever aio-pika reopens the channel."""
        self._on_delivery = on_delivery
        self._channel.reopen_callbacks.add(self._on_reopen)
        await self._consume()

    async def stop(self, timeout_s: float) -> None:
        """Consume no more; cancelling waits for the broker (at most `timeout_s`). What comes
        until the broker has the cancel is still handed over."""
        self._stopping = True
        self._channel.reopen_callbacks.discard(self._on_reopen)
        if self._resubscribing is not None:
            self._resubscribing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resubscribing
        if self._consuming is None:
            return
        protocol_channel, tag = self._consuming
        self._consuming = None
        try:
            async with asyncio.timeout(timeout_s):
                await protocol_channel.basic_cancel(tag)
        finally:
            direct_deliveries.unroute(tag)

    async def _consume(self) -> None:
        protocol_channel = await self._channel.get_underlay_channel()
        protocol_channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        tag = direct_deliveries.new_consumer_tag(protocol_channel.number)
        # Routed before the consume: every delivery then comes the same way, in order.
        direct_deliveries.route(tag, protocol_channel.number, partial(self._take, protocol_channel))
        try:
            await protocol_channel.basic_consume(self._queue, self._deliver, consumer_tag=tag)
        except BaseException:
            direct_deliveries.unroute(tag)
            raise
        self._consuming = (protocol_channel, tag)

    def _take(
        self,
        channel: aiormq.abc.AbstractChannel,
        deliver: aiormq.spec.Basic.Deliver,
        properties: aiormq.spec.Basic.Properties,
        body: bytes,
    ) -> None:
        if self._on_delivery is not None:
            self._on_delivery(Delivery.of(channel, deliver, properties, body))

    async def _deliver(self, message: DeliveredMessage) -> None:
        """aiormq's way, where it reads the frames itself (`infra.frame_reader.install`)."""
        deliver = cast(aiormq.spec.Basic.Deliver, message.delivery)  # what a consumer gets
        self._take(message.channel, deliver, message.header.properties, message.body)

    def _forget_consumer(self) -> None:
        if self._consuming is not None:
            direct_deliveries.unroute(self._consuming[1])
            self._consuming = None

    def _on_reopen(self, _channel: Any) -> None:
        # aio-pika has declared the queue again by now: consume on the new protocol channel.
        self._forget_consumer()
        self._resubscribe("channel reopened; subscribing again", redeclare=False)

    def _on_broker_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if self._consuming is None or frame.consumer_tag != self._consuming[1]:
            return
        log.warning("the broker cancelled the consumer of %s; subscribing again", self._queue)
        self._forget_consumer()
        self._resubscribe("consumer cancelled by the broker; subscribing again", redeclare=True)

    def _resubscribe(self, because: str, *, redeclare: bool) -> None:
        if self._stopping or self._resubscribing is not None:
            return
        self._resubscribing_because = because
        self._resubscribing = asyncio.get_running_loop().create_task(
            self._resubscribe_until_done(redeclare), name=f"resubscribe-{self._queue}"
        )

    async def _resubscribe_until_done(self, redeclare: bool) -> None:
        attempt = 0
        try:
            while not self._stopping:
                try:
                    if redeclare:
                        await self._redeclare()
                    await self._consume()
                    return
                except Exception as exc:
                    # The channel is closed again (its reopen starts over), or the queue is
                    # not there yet: try again.
                    delay = RESUBSCRIBE_BACKOFF_S[min(attempt, len(RESUBSCRIBE_BACKOFF_S) - 1)]
                    attempt += 1
                    log.warning("could not consume %s (%r); again in %gs", self._queue, exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self._resubscribing = self._resubscribing_because = None
