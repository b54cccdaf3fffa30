"""`infra.broker.connect_once`: a connection attempt that fails leaves nothing behind."""

from __future__ import annotations

import gc
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest
from conftest import Services, free_port

from infra.broker import connect_once


def unclosed_connections_to(port: int) -> list[aio_pika.RobustConnection]:
    gc.collect()
    return [
        found
        for found in gc.get_objects()
        if isinstance(found, aio_pika.RobustConnection)
        and found.url.port == port
        and not found.is_closed
    ]


async def test_a_failed_attempt_closes_the_connection_it_made(services: Services) -> None:
    # Dropped unclosed, aio-pika's finalizer makes a close() coroutine that, collected away
    # from the event loop, is never awaited: a warning at a random later test.
    port = free_port()  # nothing listens there
    target = urlsplit(services.amqp_url)
    url = target._replace(netloc=f"{target.username}:{target.password}@127.0.0.1:{port}")
    with pytest.raises((OSError, aiormq.exceptions.AMQPConnectionError)):
        await connect_once(url.geturl(), name="cpt-connect-once")
    assert unclosed_connections_to(port) == []


async def test_an_attempt_that_succeeds_gives_an_open_named_connection(
    services: Services,
) -> None:
    connection = await connect_once(services.amqp_url, name="cpt-connect-once")
    try:
        assert not connection.is_closed
        assert connection.kwargs["client_properties"]["connection_name"] == "cpt-connect-once"
        channel = await connection.channel()
        await channel.close()
        port = urlsplit(services.amqp_url).port or 5672
        assert connection in unclosed_connections_to(port)
    finally:
        await connection.close()
    assert connection.is_closed
