"""Run the configured sinks: one consumer each, on a shared pair of broker connections."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aio_pika.abc import AbstractQueue

from infra.broker import connect, declare_topology, work_queue_arguments
from infra.confirmed_publisher import ConfirmedPublisher
from infra.kept_queues import bounds_of
from infra.retry import StoppedError, close_quietly
from infra.settings import Settings
from schemas import codec
from schemas.events import CallEvent, CallFields
from sinks.config import SinkConfig
from sinks.consumer import SinkConsumer
from sinks.port import DeliveryResult, Event
from sinks.registry import SinkResources, open_sink
from sinks.topology import declare_sink
from workers.migrate import migrate_when_up
from workers.storage import create_pool

log = logging.getLogger(__name__)


async def run_sinks(settings: Settings, configs: list[SinkConfig], stop: asyncio.Event) -> None:
    """Deliver events to every sink in `configs` until `stop`; in-flight deliveries finish."""
    if not configs:
        log.info("no sinks configured (CALLPIPE_SINKS_FILE): nothing to deliver")
        await stop.wait()
        return
    # Set by `stop`, or by a sink that failed: the others then finish what they hold.
    stopping = asyncio.Event()
    following = asyncio.create_task(_set_when_set(stop, stopping), name="sinks-stop")
    try:
        async with AsyncExitStack() as resources:
            try:
                declared = await _start(settings, configs, stopping, resources)
            except StoppedError:
                log.info("sinks stopped while starting")
                return
            await _run_side_by_side(settings, declared, stopping, resources)
    finally:
        following.cancel()
    log.info("sinks stopped")


async def _run_side_by_side(
    settings: Settings,
    declared: list[_Declared],
    stopping: asyncio.Event,
    resources: AsyncExitStack,
) -> None:
    """Each sink consumes as soon as it is open: one that waits for PostgreSQL (Telegram's
    alerts) holds back no other; its events wait in its queue meanwhile. When one fails, the
    others stop too and finish, and its error is raised once all have."""
    runs = [
        asyncio.create_task(
            _open_and_run(settings, sink, stopping, resources), name=f"sink-{sink.config.name}"
        )
        for sink in declared
    ]
    try:
        await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        stopping.set()
        outcomes = await asyncio.gather(*runs, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _set_when_set(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


@dataclass(frozen=True)
class _Declared:
    """A sink whose queue is declared, ready to open and consume."""

    config: SinkConfig
    queue: AbstractQueue
    publisher: ConfirmedPublisher
    shared: SinkResources


async def _open_and_run(
    settings: Settings, declared: _Declared, stop: asyncio.Event, resources: AsyncExitStack
) -> None:
    try:
        sink = await open_sink(declared.config, declared.shared)
    except StoppedError:
        return
    resources.push_async_callback(close_quietly, sink.close)
    consumer = SinkConsumer(
        declared.config, sink, declared.queue, declared.publisher, settings.topology
    )
    await consumer.run(stop, settings.shutdown_timeout_s)


async def _start(
    settings: Settings, configs: list[SinkConfig], stop: asyncio.Event, resources: AsyncExitStack
) -> list[_Declared]:
    topology = settings.topology
    pool: asyncpg.Pool | None = None
    opening = asyncio.Lock()  # sinks open side by side: one pool for all

    async def database() -> asyncpg.Pool:
        nonlocal pool
        async with opening:
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

    await declare_topology(await consume_conn.channel(), topology, bounds_of(settings))
    declared = []
    for config in configs:
        channel = await consume_conn.channel()
        await declare_sink(channel, topology, config)
        # The prefetch is the cap on requests in flight to this destination.
        await channel.set_qos(prefetch_count=config.max_in_flight)
        # Declared, not just looked up: a robust channel restores only the queues it declared,
        # and with them their consumers after a reconnect.
        queue = await channel.declare_queue(
            topology.sink_queue(config.name),
            durable=True,
            arguments=work_queue_arguments(topology),
        )
        declared.append(_Declared(config, queue, publisher, shared))
    return declared


def sample_event(now: datetime) -> Event:
    """A missed call of project `callpipe-test`, for trying a destination by hand."""
    call_id = f"test-{uuid.uuid4().hex[:8]}"
    event = CallEvent(
        event_id=f"callpipe-test:{call_id}:end",
        type="call.ended",
        occurred_at=now,
        received_at=now,
        project="callpipe-test",
        call=CallFields(
            call_id=call_id,
            caller="+79990000000",
            callee="+74950000000",
            called_at=now,
            status="NOANSWER",
            outcome="missed",
            is_missed=True,
            duration_s=0,
            source_level_1="callpipe",
            source_level_2="sinks --test",
            revision=1,
            end_received_at=now,
        ),
        raw={"id": call_id, "status": "NOANSWER"},
    )
    body = codec.dumps(event.to_json_dict())
    return Event(body, codec.loads(body), "call.ended.missed")


async def try_sink(settings: Settings, config: SinkConfig) -> DeliveryResult:
    """Deliver one sample event to the sink's destination now, bypassing its queue."""
    async with AsyncExitStack() as resources:

        async def database() -> asyncpg.Pool:
            await migrate_when_up(settings)
            pool = await create_pool(settings.database_url, settings.namespace, max_size=1)
            resources.push_async_callback(close_quietly, pool.close)
            return pool

        sink = await open_sink(config, SinkResources(database, settings.time_zone))
        resources.push_async_callback(close_quietly, sink.close)
        return await sink.deliver(sample_event(datetime.now(UTC)))
