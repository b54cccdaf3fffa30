"""Wire one worker: connections, pool, consumer. Runs until `stop` is set."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from infra.broker import connect, declare_topology
from infra.confirmed_publisher import ConfirmedPublisher
from infra.direct_consumer import DirectConsumer
from infra.kept_queues import bounds_of
from infra.retry import CLOSE_TIMEOUT_S, StoppedError, close_quietly
from infra.settings import Settings
from schemas.topology import Kind
from workers.consumer import PARALLEL_BATCHES, CallConsumer
from workers.end_queue import CallEndQueue
from workers.errors import RetryPolicy
from workers.health import WorkerMonitor
from workers.metrics import KindMetrics
from workers.migrate import migrate_when_up
from workers.outbox import OutboxRelay, RelaySettings
from workers.pipeline import Pipeline
from workers.publishing import AmqpEventPublisher
from workers.stale import StaleSweeper, start_sweeping
from workers.stale_store import PostgresStaleStore
from workers.storage import PostgresCallStore, create_pool

log = logging.getLogger(__name__)


async def run_worker(
    settings: Settings, kind: Kind, stop: asyncio.Event, monitor: WorkerMonitor | None = None
) -> None:
    """Consume `{ns}.call-<kind>` until `stop`; in-flight deliveries are finished and acked.
    `monitor`: the process's /readyz and /metrics, which this worker reports to."""
    monitor = monitor or WorkerMonitor()
    async with AsyncExitStack() as resources:
        health = monitor.watch(kind, settings.database_url)
        resources.callback(monitor.forget, health)
        try:
            consumer, relay = await _start(
                settings, kind, stop, resources, monitor.metrics.of(kind)
            )
        except StoppedError:
            log.info("worker %s stopped while starting", kind)
            return
        health.consumer = consumer
        # The relay outlives the consumer: what the last batches committed is published too.
        relay_stop = asyncio.Event()
        relaying = asyncio.create_task(relay.run(relay_stop, settings.shutdown_timeout_s))
        try:
            await consumer.run(stop, settings.shutdown_timeout_s)
        finally:
            relay_stop.set()
            await asyncio.wait({relaying}, timeout=settings.shutdown_timeout_s + CLOSE_TIMEOUT_S)
            relaying.cancel()
    log.info("worker %s stopped", kind)


async def _start(
    settings: Settings,
    kind: Kind,
    stop: asyncio.Event,
    resources: AsyncExitStack,
    metrics: KindMetrics,
) -> tuple[CallConsumer, OutboxRelay]:
    topology = settings.topology
    await migrate_when_up(settings, stop)
    # Separate connections: a blocked publisher (broker alarm) must not freeze the acks.
    consume_conn = await connect(settings.amqp_url, name=f"callpipe-worker-{kind}", stop=stop)
    resources.push_async_callback(close_quietly, consume_conn.close)
    publish_conn = await connect(
        settings.amqp_url, name=f"callpipe-worker-{kind}-publish", stop=stop
    )
    resources.push_async_callback(close_quietly, publish_conn.close)
    # A connection per batch in flight, two for the relay (fresh events, and its sweep for
    # left-over ones), and one for the stale sweep of a start worker.
    connections = PARALLEL_BATCHES + 2 + (1 if kind == "start" else 0)
    pool = await create_pool(settings.database_url, settings.namespace, connections)
    resources.push_async_callback(close_quietly, pool.close)

    channel = await consume_conn.channel()
    await declare_topology(channel, topology, bounds_of(settings))
    await channel.set_qos(prefetch_count=settings.prefetch)
    # Declared (and bound) again by aio-pika after a reconnect; by the consumer after the
    # broker cancelled it (the queue was deleted).
    source = DirectConsumer(
        channel,
        topology.call_queue(kind),
        redeclare=lambda: declare_topology(channel, topology, bounds_of(settings)),
    )
    publisher = await ConfirmedPublisher.open(publish_conn, settings.publish_timeout_s)
    events = AmqpEventPublisher(publisher, topology)
    pipeline = Pipeline(
        store=PostgresCallStore(pool), region=settings.default_region, tz=settings.time_zone
    )
    batch_max = max(1, settings.prefetch // PARALLEL_BATCHES)
    # A relay round may take as many events as the worker holds deliveries: it keeps up with
    # two batches, and a crash repeats at most that many events.
    relay = OutboxRelay(pool, events, RelaySettings(batch_max=settings.prefetch), metrics)
    if kind == "start":
        # Calls whose end never came are found by each start worker: no process to add for
        # ops, and replicas sweep side by side (rows are taken with SKIP LOCKED).
        sweeper = StaleSweeper(
            PostgresStaleStore(pool),
            events,
            CallEndQueue(publish_conn, topology.call_queue("end")),
            settings.stale_after_min,
            settings.stale_sweep_s,
        )
        start_sweeping(sweeper, stop, resources, settings.shutdown_timeout_s)
    consumer = CallConsumer(
        source, kind, pipeline, events, relay, RetryPolicy(), metrics, batch_max=batch_max
    )
    return consumer, relay
