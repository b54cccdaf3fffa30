"""The confirmed publisher on the real broker: a 200 may never stand for a returned message."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from callpipe.broker import ConfirmedPublisher, PublishFailedError


async def test_concurrent_duplicates_to_an_unroutable_route_all_fail(
    amqp: AbstractRobustConnection,
) -> None:
    """aiormq matches a return to its publish by message_id: with two publishes of one id in
    flight, a return could fail the wrong one and the returned one be confirmed."""
    exchange = f"cpt_unroutable_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=False)
    publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
    try:
        for _ in range(5):
            results = await asyncio.gather(
                *(
                    publisher.publish(exchange, "nowhere", b"{}", message_id="acme:1:start")
                    for _ in range(20)
                ),
                return_exceptions=True,
            )
            assert all(isinstance(result, PublishFailedError) for result in results), results
    finally:
        await publisher.close()
        async with amqp.channel() as channel:
            await channel.exchange_delete(exchange)
