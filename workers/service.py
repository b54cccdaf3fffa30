"""Wire one worker: connections, pool, consumer. Runs until `stop` is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from callpipe.broker import ConfirmedPublisher, connect, declare_topology, work_queue_arguments
from callpipe.settings import Settings
from schemas.topology import Kind
from workers.consumer import AmqpEventPublisher, CallConsumer
from workers.errors import RetryPolicy
from workers.migrate import migrate
from workers.pipeline import Pipeline
from workers.storage import PostgresCallStore, create_pool

log = logging.getLogger(__name__)

T = TypeVar("T")


async def retry_until_done(
    what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T:
    """Start-up steps wait for their service to come up instead of crashing the worker."""
    delay = 0.5
    while True:
        try:
            return await attempt()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if stop.is_set():
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, 10.0)


async def migrate_database(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await migrate(conn, settings.namespace)
    finally:
        await conn.close()


async def run_worker(settings: Settings, kind: Kind, stop: asyncio.Event) -> None:
    """Consume `{ns}.call-<kind>` until `stop`; in-flight deliveries are finished and acked."""
    topology = settings.topology
    await retry_until_done("database migration", lambda: migrate_database(settings), stop)
    # Separate connections: a blocked publisher (broker alarm) must not freeze the acks.
    consume_conn = await connect(settings.amqp_url, name=f"callpipe-worker-{kind}", stop=stop)
    publish_conn = await connect(
        settings.amqp_url, name=f"callpipe-worker-{kind}-publish", stop=stop
    )
    pool = await create_pool(settings.database_url, settings.namespace, min(settings.prefetch, 10))
    try:
        channel = await consume_conn.channel()
        await declare_topology(channel, topology)
        await channel.set_qos(prefetch_count=settings.prefetch)
        queue = await channel.declare_queue(
            topology.call_queue(kind), durable=True, arguments=work_queue_arguments(topology)
        )
        publisher = await ConfirmedPublisher.open(publish_conn, settings.publish_timeout_s)
        events = AmqpEventPublisher(publisher, topology)
        pipeline = Pipeline(
            store=PostgresCallStore(pool),
            events=events,
            region=settings.default_region,
            tz=settings.time_zone,
        )
        consumer = CallConsumer(queue, kind, pipeline, events, RetryPolicy())
        await consumer.run(stop, settings.shutdown_timeout_s)
    finally:
        for closing in (consume_conn.close(), publish_conn.close(), pool.close()):
            try:
                await asyncio.wait_for(closing, timeout=settings.shutdown_timeout_s)
            except Exception as exc:  # closing what is already broken must not fail the stop
                log.warning("worker %s: %s while closing", kind, exc)
        log.info("worker %s stopped", kind)
