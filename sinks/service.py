"""Run the configured sinks: one consumer each, on a shared pair of broker connections."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import asyncpg

from callpipe.broker import ConfirmedPublisher, connect, declare_topology
from callpipe.retry import StoppedError
from callpipe.settings import Settings
from sinks.config import SinkConfig
from sinks.consumer import SinkConsumer
from sinks.registry import SinkResources, open_sink
from sinks.topology import declare_sink
from workers.service import close_quietly, migrate_when_up
from workers.storage import create_pool

log = logging.getLogger(__name__)


async def run_sinks(settings: Settings, configs: list[SinkConfig], stop: asyncio.Event) -> None:
    """Deliver events to every sink in `configs` until `stop`; in-flight deliveries finish."""
    if not configs:
        log.info("no sinks configured (CALLPIPE_SINKS_FILE): nothing to deliver")
        await stop.wait()
        return
    async with AsyncExitStack() as resources:
        try:
            consumers = await _start(settings, configs, stop, resources)
        except StoppedError:
            log.info("sinks stopped while starting")
            return
        await asyncio.gather(
            *(consumer.run(stop, settings.shutdown_timeout_s) for consumer in consumers)
        )
    log.info("sinks stopped")


async def _start(
    settings: Settings, configs: list[SinkConfig], stop: asyncio.Event, resources: AsyncExitStack
) -> list[SinkConsumer]:
    topology = settings.topology
    pool: asyncpg.Pool | None = None

    async def database() -> asyncpg.Pool:
        nonlocal pool
        if pool is None:
            await migrate_when_up(settings, stop)
            pool = await create_pool(settings.database_url, settings.namespace, max_size=4)
            resources.push_async_callback(close_quietly, pool.close)
        return pool

    # Separate connections: a blocked publisher (broker alarm) must not freeze the acks.
    consume_conn = await connect(settings.amqp_url, name="callpipe-sinks", stop=stop)
    resources.push_async_callback(close_quietly, consume_conn.close)
    publish_conn = await connect(settings.amqp_url, name="callpipe-sinks-publish", stop=stop)
    resources.push_async_callback(close_quietly, publish_conn.close)
    publisher = await ConfirmedPublisher.open(publish_conn, settings.publish_timeout_s)
    shared = SinkResources(database=database, time_zone=settings.time_zone)

    consumers = []
    for config in configs:
        channel = await consume_conn.channel()
        await declare_topology(channel, topology)
        await declare_sink(channel, topology, config)
        # The prefetch is the cap on requests in flight to this destination.
        await channel.set_qos(prefetch_count=config.max_in_flight)
        queue = await channel.get_queue(topology.sink_queue(config.name), ensure=False)
        sink = await open_sink(config, shared)
        resources.push_async_callback(close_quietly, sink.close)
        consumers.append(SinkConsumer(config, sink, queue, publisher, topology))
    return consumers
