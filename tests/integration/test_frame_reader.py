"""Frames read in bulk on connections to the real broker: messages of every size arrive
whole, heartbeats keep an idle connection, and a cut link is noticed and reconnected."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import aiormq.connection
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from callpipe_testing import TcpProxy, wait_for
from conftest import Services

from infra.broker import connect
from infra.frame_reader import BulkFrameReceiver

# The broker's frame_max is 128 KiB by default: the largest bodies span several frames.
SIZES = [0, 1, 4095, 131_072, 300_001]


@contextlib.asynccontextmanager
async def connected(url: str, name: str) -> AsyncIterator[AbstractRobustConnection]:
    """A connection as callpipe opens them (`infra.broker.connect`), closed after."""
    connection = await connect(url, name=name)
    try:
        yield connection
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def through_proxy(
    services: Services, name: str
) -> AsyncIterator[tuple[TcpProxy, AbstractRobustConnection]]:
    proxy = TcpProxy.in_front_of(services.amqp_url)
    await proxy.start()
    try:
        async with connected(proxy.route(services.amqp_url), name) as connection:
            yield proxy, connection
    finally:
        await proxy.cut()  # closes the proxy's own server and links


async def round_trip(connection: AbstractRobustConnection, queue_name: str, count: int) -> None:
    """Publish `count` messages of every size in SIZES and get each back, whole, in order."""
    sent = [bytes([i % 251]) * size for i in range(count) for size in SIZES]
    received: list[AbstractIncomingMessage] = []
    async with connection.channel() as channel:
        queue = await channel.declare_queue(queue_name, exclusive=True)
        for number, body in enumerate(sent):
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=str(number), headers={"n": number}), queue_name
            )

        async def keep(message: AbstractIncomingMessage) -> None:
            received.append(message)

        tag = await queue.consume(keep, no_ack=True)

        async def all_there() -> bool:
            return len(received) >= len(sent)

        await wait_for(all_there, what=f"{len(sent)} messages back")
        await queue.cancel(tag)
    assert [message.body for message in received] == sent
    assert [message.headers["n"] for message in received] == list(range(len(sent)))


async def test_callpipe_connections_read_frames_in_bulk_and_messages_arrive_whole(
    services: Services, namespace: str
) -> None:
    async with connected(services.amqp_url, "cpt-frames") as connection:
        assert aiormq.connection.FrameReceiver is BulkFrameReceiver
        await round_trip(connection, f"{namespace}.frames", count=20)


async def test_an_idle_connection_lives_on_the_broker_heartbeats(
    services: Services, namespace: str
) -> None:
    # Heartbeats every second: with a receiver that did not pass them on, aiormq would call
    # the connection stuck after (1 + 1) * 3 = 6 quiet seconds and reconnect.
    url = urlsplit(services.amqp_url)._replace(query="heartbeat=1").geturl()
    async with connected(url, "cpt-heartbeat") as connection:
        reconnects: list[object] = []
        connection.reconnect_callbacks.add(lambda *_: reconnects.append(1))
        await asyncio.sleep(8)  # idle on purpose: the idle time is what is tested
        assert not connection.is_closed and reconnects == []
        await round_trip(connection, f"{namespace}.frames-idle", count=2)


async def test_a_cut_link_is_noticed_and_the_connection_comes_back(
    services: Services, namespace: str
) -> None:
    async with through_proxy(services, "cpt-frames-cut") as (proxy, connection):
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        await proxy.cut()

        async def noticed() -> bool:
            return connection.is_closed or not connection.connected.is_set()

        await wait_for(noticed, what="the cut link noticed")
        await proxy.restore()
        await asyncio.wait_for(reconnected.wait(), timeout=15)
        await round_trip(connection, f"{namespace}.frames-back", count=2)
