"""Consuming on the protocol channel under aio-pika's robust channel, on the real broker:
deliveries, settling, and consuming again after a reopen or a cancel by the broker. Each test
runs with the frames read by callpipe's receiver (deliveries taken straight from them) and by
aiormq's own (deliveries through aiormq's channel)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq.connection
import pytest
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from callpipe_testing import wait_for
from conftest import Services

from infra import direct_deliveries, frame_reader
from infra.broker import declare_topology
from infra.direct_consumer import Delivery, DirectConsumer
from infra.frame_reader import BulkFrameReceiver
from schemas.topology import Topology


@pytest.fixture(params=["callpipe", "aiormq"])
def frames_read_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which receiver reads the frames of the connections opened from now on."""
    receiver = BulkFrameReceiver if request.param == "callpipe" else frame_reader.AIORMQ_RECEIVER
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", receiver)
    return str(request.param)


@pytest.fixture
async def channel(services: Services, frames_read_by: str) -> AsyncIterator[AbstractRobustChannel]:
    """A channel on a connection of its own, read by `frames_read_by`."""
    async with await aio_pika.connect_robust(services.amqp_url, timeout=10) as connection:
        opened = await connection.channel()
        assert isinstance(opened, AbstractRobustChannel)
        yield opened


class Received:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def arrived(self, n: int) -> Callable[[], Awaitable[bool]]:
        async def enough() -> bool:
            return len(self.deliveries) >= n

        return enough


Running = tuple[Topology, DirectConsumer, Received]


@pytest.fixture
async def running(namespace: str, channel: AbstractRobustChannel) -> Running:
    """A consumer of the namespace's call-end queue, started, and what it received."""
    topology = Topology(namespace)
    consumer, received = consumer_of(channel, topology), Received()
    await consumer.start(received)
    return topology, consumer, received


def consumer_of(
    channel: AbstractRobustChannel,
    topology: Topology,
    redeclare: Callable[[], Awaitable[object]] | None = None,
) -> DirectConsumer:
    return DirectConsumer(
        channel,
        topology.call_queue("end"),
        redeclare=redeclare or (lambda: declare_topology(channel, topology)),
    )


async def publish(amqp: AbstractRobustConnection, topology: Topology, message_id: str) -> None:
    async with amqp.channel() as publishing:
        exchange = await publishing.get_exchange(topology.webhooks_exchange)
        message = aio_pika.Message(
            b'{"id": "1"}', message_id=message_id, headers={"x-callpipe-project": "acme"}
        )
        await exchange.publish(message, "roistat.call.end")


async def queued(amqp: AbstractRobustConnection, topology: Topology) -> tuple[int, int]:
    """Messages ready in the call-end queue, and its consumers."""
    async with amqp.channel() as probing:
        queue = await probing.declare_queue(topology.call_queue("end"), passive=True)
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0


async def test_a_delivery_carries_what_a_consumer_reads_and_acks_on_its_channel(
    amqp: AbstractRobustConnection, channel: AbstractRobustChannel, running: Running
) -> None:
    topology, consumer, received = running
    assert consumer.not_consuming is None
    await publish(amqp, topology, "acme:1:end")
    await wait_for(received.arrived(1), what="the delivery")
    delivery = received.deliveries[0]
    assert delivery.body == b'{"id": "1"}'
    assert delivery.headers == {"x-callpipe-project": "acme"}
    assert delivery.message_id == "acme:1:end"
    assert delivery.routing_key == "roistat.call.end"
    assert delivery.channel is await channel.get_underlay_channel()
    await delivery.ack()
    await consumer.stop(timeout_s=5)
    await channel.close()  # an unacked delivery would be back in the queue now
    assert await queued(amqp, topology) == (0, 0)


async def test_with_callpipe_s_receiver_deliveries_skip_aiormq_s_channel(
    amqp: AbstractRobustConnection,
    channel: AbstractRobustChannel,
    running: Running,
    frames_read_by: str,
) -> None:
    """Taken from the frames: aiormq's consumer callback (a task a delivery) sees none."""
    topology, consumer, received = running
    protocol_channel = await channel.get_underlay_channel()
    assert isinstance(protocol_channel, aiormq.Channel)
    [tag] = protocol_channel.consumers
    through_aiormq: list[object] = []

    async def noted(message: object) -> None:
        through_aiormq.append(message)

    protocol_channel.consumers[tag] = noted
    await publish(amqp, topology, "acme:1:end")
    await publish(amqp, topology, "acme:2:end")
    if frames_read_by == "callpipe":
        await wait_for(received.arrived(2), what="the deliveries, from the frames")
        assert through_aiormq == []
        assert [delivery.message_id for delivery in received.deliveries] == [
            "acme:1:end",
            "acme:2:end",
        ]
        for delivery in received.deliveries:
            await delivery.ack()
    else:

        async def through_the_channel() -> bool:
            return len(through_aiormq) == 2

        await wait_for(through_the_channel, what="the deliveries, through aiormq's channel")
        assert received.deliveries == []
        await protocol_channel.basic_ack(2, multiple=True)
    assert direct_deliveries.is_routed(tag)
    await consumer.stop(timeout_s=5)
    assert not direct_deliveries.is_routed(tag)


async def test_a_nacked_delivery_comes_again(
    amqp: AbstractRobustConnection, running: Running
) -> None:
    topology, consumer, received = running
    await publish(amqp, topology, "acme:1:end")
    await wait_for(received.arrived(1), what="the delivery")
    await received.deliveries[0].nack(requeue=True)
    await wait_for(received.arrived(2), what="the delivery again")
    assert received.deliveries[1].message_id == "acme:1:end"
    assert received.deliveries[1].delivery_tag != received.deliveries[0].delivery_tag
    await received.deliveries[1].ack()
    await consumer.stop(timeout_s=5)


async def test_it_consumes_again_when_the_broker_closed_the_channel(
    amqp: AbstractRobustConnection, channel: AbstractRobustChannel, running: Running
) -> None:
    topology, consumer, received = running
    first = await closed_by_the_broker(channel)

    async def consuming_again() -> bool:
        return consumer.not_consuming is None and await queued(amqp, topology) == (0, 1)

    await wait_for(consuming_again, what="a consumer on the reopened channel")
    assert not any(direct_deliveries.is_routed(tag) for tag in first.consumers)
    await publish(amqp, topology, "acme:2:end")
    await wait_for(received.arrived(1), what="a delivery on the reopened channel")
    assert received.deliveries[0].channel is not first
    await received.deliveries[0].ack()
    await consumer.stop(timeout_s=5)


async def test_a_deleted_queue_is_declared_again_and_consumed(
    amqp: AbstractRobustConnection, namespace: str, channel: AbstractRobustChannel
) -> None:
    topology = Topology(namespace)
    declared: list[int] = []

    async def redeclare_failing_once() -> None:
        declared.append(1)
        if len(declared) == 1:
            raise RuntimeError("not yet")
        await declare_topology(channel, topology)

    consumer, received = consumer_of(channel, topology, redeclare_failing_once), Received()
    await consumer.start(received)
    async with amqp.channel() as deleting:
        await deleting.queue_delete(topology.call_queue("end"))

    async def told_why() -> bool:  # while the first declaration's retry waits
        return consumer.not_consuming == "consumer cancelled by the broker; subscribing again"

    await wait_for(told_why, what="the reason it does not consume, while it retries")

    async def consuming_again() -> bool:
        return consumer.not_consuming is None and bool(declared)

    await wait_for(consuming_again, what="the queue declared again and consumed")
    assert len(declared) == 2  # the failed declaration was tried again
    assert await queued(amqp, topology) == (0, 1)
    await publish(amqp, topology, "acme:3:end")  # bound again: it reaches the queue
    await wait_for(received.arrived(1), what="a delivery from the new queue")
    await received.deliveries[0].ack()
    await consumer.stop(timeout_s=5)


async def test_after_a_stop_nothing_is_delivered_even_after_a_reopen(
    amqp: AbstractRobustConnection, channel: AbstractRobustChannel, running: Running
) -> None:
    topology, consumer, received = running
    await consumer.stop(timeout_s=5)
    assert consumer.not_consuming == "not consuming"
    first = await closed_by_the_broker(channel)
    await wait_for(lambda: _reopened(channel, first), what="the channel reopened")
    await publish(amqp, topology, "acme:4:end")
    assert await wait_for(lambda: _one_ready(amqp, topology), what="the message left queued")
    assert received.deliveries == []


async def closed_by_the_broker(channel: AbstractRobustChannel) -> aiormq.Channel:
    """Make the broker close `channel`'s protocol channel (an ack of a delivery tag it never
    sent); the closed one, once it is closed. aio-pika reopens the channel after it."""
    protocol_channel = await channel.get_underlay_channel()
    assert isinstance(protocol_channel, aiormq.Channel)
    await protocol_channel.basic_ack(10**6)

    async def closed() -> bool:
        return protocol_channel.is_closed

    await wait_for(closed, what="the broker to close the channel")
    return protocol_channel


async def _reopened(channel: AbstractRobustChannel, old: object) -> bool:
    return not channel.is_closed and await channel.get_underlay_channel() is not old


async def _one_ready(amqp: AbstractRobustConnection, topology: Topology) -> bool:
    return await queued(amqp, topology) == (1, 0)
