"""Workers when input is poison, PostgreSQL or RabbitMQ goes away, or the process dies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from callpipe_testing import TcpProxy, refuse_call, wait_for
from conftest import Collector, Services, Workers, make_settings

from callpipe.replay import replay_dead
from infra.broker import plain_headers
from infra.settings import Settings
from schemas import codec
from schemas.topology import DELIVERY_LIMIT, Topology
from workers.delivery import decode_delivery
from workers.enrich import enrich
from workers.events import render_outbox
from workers.service import run_worker
from workers.storage import PostgresCallStore, create_pool


def webhook(
    call_id: str, *, project: str | None = "acme", kind: str = "end", **fields: Any
) -> aio_pika.Message:
    """A message as the ingress publishes it."""
    headers: dict[str, Any] = {
        "x-callpipe-kind": kind,
        "x-callpipe-received-at": datetime.now(UTC).isoformat(),
    }
    if project is not None:
        headers["x-callpipe-project"] = project
    body = codec.dumps({"id": call_id, "caller": "79990009911", "status": "ANSWER", **fields})
    return aio_pika.Message(
        body,
        headers=headers,
        message_id=f"{project}:{call_id}:{kind}",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish(
    amqp: AbstractRobustConnection,
    topology: Topology,
    messages: list[aio_pika.Message],
    kind: str = "end",
) -> None:
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(topology.webhooks_exchange)
        for message in messages:
            await exchange.publish(message, f"roistat.call.{kind}")


async def stored_calls(db: asyncpg.Pool, settings: Settings) -> int:
    count: int = await db.fetchval(f'SELECT count(*) FROM "{settings.namespace}".calls')
    return count


async def published_events(db: asyncpg.Pool, settings: Settings) -> int:
    count: int = await db.fetchval(
        f'SELECT count(*) FROM "{settings.namespace}".call_events WHERE published_at IS NOT NULL'
    )
    return count


async def queue_depth(amqp: AbstractRobustConnection, name: str) -> int:
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        return count or 0


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (webhook("no-project", project=None), "missing header x-callpipe-project"),
        (aio_pika.Message(b"[1, 2]", headers={"x-callpipe-project": "acme"}), "not_object"),
        (aio_pika.Message(b"\xff", headers={"x-callpipe-project": "acme"}), "not_utf8"),
    ],
    ids=["no-project", "array", "not-utf8"],
)
async def test_poison_message_goes_to_dead_with_the_reason_and_the_queue_moves_on(
    settings: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
    message: aio_pika.Message,
    reason: str,
) -> None:
    dead: Collector = await subscribe(settings.topology.dead_exchange, "")
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [message, webhook("healthy")])
    await wait_for(lambda: _arrived(dead), what="the dead letter")
    [kept] = dead.messages
    assert kept.body == message.body
    assert reason in plain_headers(kept.headers)["x-callpipe-error"]
    await wait_for(lambda: stored_calls(db, settings), what="the healthy call after it")


async def _arrived(collector: Collector) -> bool:
    return bool(collector.messages)


@pytest.mark.parametrize("returned_by", ["reject", "consumer-dies"])
async def test_delivery_limit_dead_letters_a_message_that_keeps_coming_back(
    settings: Settings, amqp: AbstractRobustConnection, subscribe: Any, returned_by: str
) -> None:
    """The broker side of the promise: a poison loop ends in {ns}.dead, on RabbitMQ 3.x too.

    Returned the two ways that count towards the delivery limit on 3.x and on 4.3+ alike: a
    basic.reject with requeue (a failed delivery), and a consumer whose channel closes while
    it holds the delivery (a worker that crashed on it). basic.nack with requeue counts only
    up to 4.2: from 4.3 it is a hand-back, not a failure, so it never reaches the limit.
    """
    dead: Collector = await subscribe(settings.topology.dead_exchange, "")
    await publish(amqp, settings.topology, [webhook("boomerang")])
    return_once = _reject_once if returned_by == "reject" else _take_and_die
    returns = 0
    while await return_once(amqp, settings.topology.call_queue("end"), dead):
        returns += 1
        assert returns <= DELIVERY_LIMIT + 1, "the delivery limit did not stop the loop"
    assert returns in (DELIVERY_LIMIT, DELIVERY_LIMIT + 1)  # 3.x counts from 0, 4.x from 1
    assert dead.messages[0].message_id == "acme:boomerang:end"


async def _reject_once(amqp: AbstractRobustConnection, queue_name: str, dead: Collector) -> bool:
    """basic.get the message and reject it with requeue; False once it is dead-lettered."""
    async with amqp.channel() as channel:
        queue = await channel.get_queue(queue_name)

        async def redelivered_or_dead() -> Any:
            return "dead" if dead.messages else await queue.get(fail=False)

        message = await wait_for(redelivered_or_dead, what="a redelivery or the dead letter")
        if message == "dead":
            return False
        await message.reject(requeue=True)
        return True


async def _take_and_die(amqp: AbstractRobustConnection, queue_name: str, dead: Collector) -> bool:
    """Consume the message on a channel of its own and close that channel without settling it,
    as a worker that dies does; False once it is dead-lettered."""
    channel = await amqp.channel()
    try:
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(queue_name)
        held: list[AbstractIncomingMessage] = []

        async def hold(message: AbstractIncomingMessage) -> None:
            held.append(message)  # never settled

        await queue.consume(hold)

        async def delivered_or_dead() -> str | None:
            return "dead" if dead.messages else "delivered" if held else None

        return await wait_for(delivered_or_dead, what="a delivery or the dead letter") != "dead"
    finally:
        await channel.close()  # with the delivery unsettled: the broker takes it back


async def test_concurrent_duplicates_store_one_row_and_publish_one_event(
    settings: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    await publish(amqp, settings.topology, [webhook("same") for _ in range(20)])
    for _ in range(3):  # competing consumers, each with prefetch 16
        workers.start(settings, "end")
    await wait_for(lambda: published_events(db, settings), what="the event published")
    await workers.stop_all()
    assert await queue_depth(amqp, settings.topology.call_queue("end")) == 0
    assert await stored_calls(db, settings) == 1
    assert await published_events(db, settings) == 1
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.answered")
    assert [m.message_id for m in events.messages] == ["acme:same:end"]


@pytest.fixture
async def proxies(services: Services) -> AsyncIterator[dict[str, TcpProxy]]:
    made = {}
    for name, url in (("amqp", services.amqp_url), ("db", services.database_url)):
        made[name] = TcpProxy.in_front_of(url)
        await made[name].start()
    try:
        yield made
    finally:
        for proxy in made.values():
            await proxy.cut()


@pytest.fixture
def settings_through_db_proxy(
    services: Services, namespace: str, proxies: dict[str, TcpProxy]
) -> Settings:
    """Settings whose database is reached through this test's own proxy."""
    return make_settings(
        services, namespace, database_url=proxies["db"].route(services.database_url)
    )


async def test_database_down_holds_the_message_and_stores_it_when_back(
    settings_through_db_proxy: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    proxies: dict[str, TcpProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_through_db_proxy
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [webhook("before")])
    await wait_for(lambda: stored_calls(db, settings), what="the first call")

    await proxies["db"].cut()
    await publish(amqp, settings.topology, [webhook("during-outage")])

    async def held_and_retried() -> bool:
        retried = "delivery acme:during-outage:end failed (attempt 2), retrying" in caplog.text
        depth = await queue_depth(amqp, settings.topology.call_queue("end"))
        return retried and depth == 0 and await stored_calls(db, settings) == 1

    await wait_for(held_and_retried, seconds=30, what="the worker to hold and retry the message")
    await proxies["db"].restore()

    async def both_stored() -> bool:
        return await stored_calls(db, settings) == 2 and await published_events(db, settings) == 2

    await wait_for(both_stored, seconds=30, what="the held call stored after the outage")


async def test_a_deleted_call_queue_is_declared_again_and_the_worker_goes_on(
    settings: Settings, amqp: AbstractRobustConnection, db: asyncpg.Pool, workers: Workers
) -> None:
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [webhook("before")])
    await wait_for(lambda: stored_calls(db, settings), what="the first call")
    queue = settings.topology.call_queue("end")
    async with amqp.channel() as channel:
        await channel.queue_delete(queue)  # the broker cancels the worker's consumer

    async def consumed_again() -> bool:
        async with amqp.channel() as channel:
            with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                declared = await channel.declare_queue(queue, passive=True)
                return declared.declaration_result.consumer_count == 1
        return False

    await wait_for(consumed_again, what="the queue declared again, with the worker on it")
    await publish(amqp, settings.topology, [webhook("after")])  # bound again: it arrives

    async def both_published() -> bool:
        return await published_events(db, settings) == 2

    await wait_for(both_published, what="the call sent after the deletion stored")


async def test_broker_drop_loses_nothing(
    services: Services,
    namespace: str,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    proxies: dict[str, TcpProxy],
    subscribe: Any,
) -> None:
    events: Collector = await subscribe(f"{namespace}.events", "call.#")
    settings = make_settings(
        services,
        namespace,
        amqp_url=proxies["amqp"].route(services.amqp_url, "?reconnect_interval=0.5"),
        publish_timeout_s=1.0,
    )
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [webhook(f"a{n}") for n in range(20)])
    await wait_for(lambda: _stored_at_least(db, settings, 1), what="some calls stored")
    await proxies["amqp"].cut()
    await publish(amqp, settings.topology, [webhook(f"b{n}") for n in range(20)])
    await proxies["amqp"].restore()

    async def all_published() -> bool:
        return await published_events(db, settings) == 40

    await wait_for(all_published, seconds=40, what="all 40 calls stored and published")
    assert await stored_calls(db, settings) == 40
    await wait_for(lambda: _collected_ids(events, 40), what="40 distinct events")


async def _stored_at_least(db: asyncpg.Pool, settings: Settings, n: int) -> bool:
    return await stored_calls(db, settings) >= n


async def _collected_ids(events: Collector, n: int) -> bool:
    return len({m.message_id for m in events.messages}) >= n


def worker_process_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "CALLPIPE_AMQP_URL": settings.amqp_url,
        "CALLPIPE_DATABASE_URL": settings.database_url,
        "CALLPIPE_NAMESPACE": settings.namespace,
        "CALLPIPE_PREFETCH": "8",
        "CALLPIPE_LOG_LEVEL": "INFO",
        "CALLPIPE_SHUTDOWN_TIMEOUT_S": "20",
    }


async def start_worker_process(
    settings: Settings, stderr: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        "worker",
        "end",
        env=worker_process_env(settings),
        stderr=stderr,
    )


async def _settled(db: asyncpg.Pool, settings: Settings) -> int | None:
    """The stored count once two reads in a row agree (commits already on the wire landed)."""
    first = await stored_calls(db, settings)
    second = await stored_calls(db, settings)
    return first if first == second else None


async def test_worker_killed_mid_stream_loses_nothing_after_restart(
    settings_through_db_proxy: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    subscribe: Any,
    proxies: dict[str, TcpProxy],
) -> None:
    settings = settings_through_db_proxy
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    total = 400
    await publish(amqp, settings.topology, [webhook(f"k{n}") for n in range(total)])
    process = await start_worker_process(settings)
    try:
        await wait_for(lambda: _stored_at_least(db, settings, 20), what="the worker under way")
        # Freeze its database link: deliveries are now surely in the middle of processing.
        proxies["db"].freeze()
        process.send_signal(signal.SIGKILL)
        await process.wait()
        assert await stored_calls(db, settings) < total
        proxies["db"].thaw()
        process = await start_worker_process(settings)

        async def all_published() -> bool:
            return await published_events(db, settings) == total

        await wait_for(all_published, seconds=60, what="every call stored and published")
    finally:
        process.terminate()
        await process.wait()
    assert await stored_calls(db, settings) == total
    await wait_for(lambda: _collected_ids(events, total), what="an event for every call")


async def test_sigterm_finishes_in_flight_and_exits_0(
    settings_through_db_proxy: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    proxies: dict[str, TcpProxy],
) -> None:
    settings = settings_through_db_proxy
    total = 200
    await publish(amqp, settings.topology, [webhook(f"t{n}") for n in range(total)])
    process = await start_worker_process(settings, stderr=asyncio.subprocess.PIPE)
    log_lines: list[str] = []

    async def read_log() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log_lines.append(line.decode())

    reading = asyncio.create_task(read_log())
    try:
        await wait_for(lambda: _stored_at_least(db, settings, 10), what="the worker under way")
        proxies["db"].freeze()  # deliveries in flight, held mid-transaction
        before = await wait_for(lambda: _settled(db, settings), what="commits to settle")
        process.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return any("finishing" in line for line in log_lines)

        await wait_for(draining, what="the worker to stop consuming and drain")
        proxies["db"].thaw()  # only now can the deliveries in flight finish
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await reading
    stored = await stored_calls(db, settings)
    assert stored > before, "the deliveries in flight at SIGTERM were not finished"

    # Everything it took is stored and acked; the rest is still queued for the next worker.
    async def accounted_for() -> bool:
        queued = await queue_depth(amqp, settings.topology.call_queue("end"))
        return stored + queued == total

    await wait_for(accounted_for, what="every message stored or still queued")
    assert await published_events(db, settings) == stored


async def test_a_stored_but_unpublished_event_goes_out_once_by_the_sweep(
    settings: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stored event left unpublished (its worker died between the commit and the publish)
    goes out with the outbox relay's sweep of left-over events; its webhook coming again (the
    broker's redelivery) is a duplicate and publishes nothing more."""
    caplog.set_level(logging.INFO, logger="workers.pipeline")
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    message = webhook("half-done")
    pool = await create_pool(settings.database_url, settings.namespace, 2)
    try:
        received = decode_delivery(message.body, plain_headers(message.headers), "end")
        call = enrich(received.payload, region="RU", tz=settings.time_zone)
        stored = await PostgresCallStore(pool).record([(received, call)], render_outbox)
        assert stored.recorded[0].stored
        sent = [orjson.loads(event.body) for event in stored.events]
    finally:
        await pool.close()
    await db.execute(f'UPDATE "{settings.namespace}".call_events SET published_at = NULL')
    assert await published_events(db, settings) == 0

    workers.start(settings, "end")
    await wait_for(lambda: _arrived(events), seconds=30, what="the event sent by the sweep")
    assert await published_events(db, settings) == 1
    await publish(amqp, settings.topology, [message])  # the broker's redelivery

    async def seen_again() -> bool:
        return "acme:half-done:end" in caplog.text and "duplicate" in caplog.text

    await wait_for(seen_again, what="the redelivery taken as a duplicate")
    await events.settle(amqp, settings.topology.events_exchange, "call.marker")
    assert [m.message_id for m in events.messages] == ["acme:half-done:end"]
    assert events.bodies() == sent
    assert await stored_calls(db, settings) == 1


async def test_sigterm_while_the_broker_is_unreachable_still_stops_the_worker(
    services: Services,
    namespace: str,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    proxies: dict[str, TcpProxy],
) -> None:
    settings = make_settings(
        services,
        namespace,
        amqp_url=proxies["amqp"].route(services.amqp_url, "?reconnect_interval=0.5"),
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, "end", stop))
    await publish(amqp, settings.topology, [webhook("x")])
    await wait_for(lambda: stored_calls(db, settings), what="the worker under way")
    await proxies["amqp"].cut()
    stop.set()
    await asyncio.wait_for(worker, timeout=15)  # returns, and does not raise


async def test_stop_while_waiting_for_the_database_at_start_up_is_a_clean_stop(
    settings_through_db_proxy: Settings, proxies: dict[str, TcpProxy]
) -> None:
    proxies["db"].freeze()  # connections open, then hang: the worst case for a stop
    settings = settings_through_db_proxy
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, "start", stop))
    await wait_for(lambda: _attempted(proxies["db"]), what="a first connection attempt")
    assert not worker.done()
    stop.set()
    await asyncio.wait_for(worker, timeout=15)


async def _attempted(proxy: TcpProxy) -> bool:
    return proxy.accepted > 0


async def test_replay_dead_sends_call_webhooks_back_and_keeps_the_rest(
    settings: Settings, amqp: AbstractRobustConnection, db: asyncpg.Pool, workers: Workers
) -> None:
    topology = settings.topology
    dead_again = webhook("dead-once")
    dead_again.headers["x-callpipe-error"] = "TransientError: database was down for hours"
    async with amqp.channel() as channel:
        dead = await channel.get_exchange(topology.dead_exchange)
        await dead.publish(dead_again, "roistat.call.end")
        await dead.publish(aio_pika.Message(b"not a webhook"), "something.else")

    report = await replay_dead(amqp, topology, limit=100, timeout_s=5)
    assert (report.replayed, report.kept) == (1, 1)
    assert await queue_depth(amqp, topology.dead_queue) == 1

    async with amqp.channel() as channel:
        queue = await channel.get_queue(topology.call_queue("end"))
        replayed = await wait_for(lambda: queue.get(fail=False), what="the replayed webhook")
        await replayed.nack(requeue=True)
    assert replayed.body == dead_again.body
    assert "x-callpipe-error" not in (replayed.headers or {})
    assert plain_headers(replayed.headers)["x-callpipe-project"] == "acme"

    workers.start(settings, "end")
    await wait_for(lambda: published_events(db, settings), what="the replayed call stored")


async def test_an_unexpected_error_is_retried_a_few_times_then_dead_lettered(
    settings: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
) -> None:
    """A failure nobody classified (here a trigger of this test's schema) is not retried
    forever: after the policy's tries the message is kept in {ns}.dead and the queue moves on."""
    await refuse_call(db, settings.namespace, "cursed", message="cursed call")
    dead: Collector = await subscribe(settings.topology.dead_exchange, "")
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [webhook("cursed"), webhook("fine")])
    await wait_for(lambda: _arrived(dead), what="the dead letter")
    assert dead.messages[0].message_id == "acme:cursed:end"
    assert "cursed call" in plain_headers(dead.messages[0].headers)["x-callpipe-error"]
    await wait_for(lambda: stored_calls(db, settings), what="the next call stored")
    await workers.stop_all()
    assert await queue_depth(amqp, settings.topology.call_queue("end")) == 0
    assert await stored_calls(db, settings) == 1
    assert len(dead.messages) == 1


@pytest.mark.parametrize(
    ("errcode", "kind_of_error"),
    [("22023", "DataError: refused"), ("P0001", "RaiseError: refused")],
    ids=["refused-data", "unclassified-error"],
)
async def test_a_poison_webhook_in_a_batch_is_found_and_dead_lettered_and_the_rest_stored(
    services: Services,
    namespace: str,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
    errcode: str,
    kind_of_error: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40 webhooks wait in the queue and are taken in large batches; PostgreSQL refuses one
    of them. The batch is split until that one is alone: it alone is dead-lettered (at once
    when the database calls the data bad, after the policy's tries when nobody classified the
    error), and the 39 others are stored and published once each."""
    settings = make_settings(services, namespace, prefetch=128)
    await refuse_call(db, namespace, "b17", message="refused", errcode=errcode)
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    dead: Collector = await subscribe(settings.topology.dead_exchange, "")
    await publish(amqp, settings.topology, [webhook(f"b{n}") for n in range(40)])
    workers.start(settings, "end")
    await wait_for(lambda: _arrived(dead), what="the dead letter")
    assert [m.message_id for m in dead.messages] == ["acme:b17:end"]
    assert (
        kind_of_error.split(":")[1].strip()
        in plain_headers(dead.messages[0].headers)["x-callpipe-error"]
    )

    async def all_published() -> bool:
        return await published_events(db, settings) == 39

    await wait_for(all_published, what="the 39 healthy events published")
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.marker")
    ids = [str(m.message_id) for m in events.messages]
    assert sorted(ids) == sorted(f"acme:b{n}:end" for n in range(40) if n != 17)
    await workers.stop_all()
    assert await queue_depth(amqp, settings.topology.call_queue("end")) == 0
    assert len(dead.messages) == 1
    split = [r.getMessage() for r in caplog.records if "storing it in halves" in r.getMessage()]
    assert split, "the poison was never in a batch with others"


async def test_a_delivery_that_waits_out_retries_holds_neither_the_acks_nor_the_prefetch(
    services: Services,
    namespace: str,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Acks go out as one `multiple` ack for the run of committed deliveries at the front.
    A delivery that fails again and again (here a serialization failure on every try,
    retried without end) must not keep the ones after it unacked: with a prefetch of 16,
    40 later webhooks are all stored while it still waits, and the broker then holds only it."""
    settings = make_settings(services, namespace, prefetch=16)
    await refuse_call(db, namespace, "stuck", message="try again", errcode="40001")
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [webhook("stuck")])

    async def retrying() -> bool:
        return any("acme:stuck:end failed" in r.getMessage() for r in caplog.records)

    await wait_for(retrying, what="the first retry of the stuck delivery")
    await publish(amqp, settings.topology, [webhook(f"after-{n}") for n in range(40)])

    async def all_stored() -> bool:
        return await stored_calls(db, settings) == 40

    await wait_for(all_stored, what="the 40 webhooks after it stored (more than the prefetch)")
    assert await queue_depth(amqp, settings.topology.call_queue("end")) == 0
    await workers.stop_all()
    # Stopped: it alone was handed back; the 40 were acked.
    assert await queue_depth(amqp, settings.topology.call_queue("end")) == 1


async def test_a_delivery_handed_back_at_a_stop_is_not_acked_by_the_run_behind_it(
    services: Services,
    namespace: str,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
) -> None:
    """A delivery is still in the database while later ones are committed: their acks wait
    behind it. The worker is stopped; the database then fails the slow one, which goes back
    to the queue. Its nack must leave before the `multiple` ack of the run behind it: the
    other way round, that ack would ack it too (lost), and the nack would close the channel."""
    settings = make_settings(services, namespace, prefetch=32)
    await db.execute(
        f"""
        CREATE FUNCTION "{namespace}".slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.call_id = 'slow' THEN
                PERFORM pg_sleep(4);
                RAISE EXCEPTION 'try again' USING ERRCODE = '40001';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow BEFORE INSERT ON "{namespace}".calls
            FOR EACH ROW EXECUTE FUNCTION "{namespace}".slow();
        """
    )
    workers.start(settings, "end")
    await publish(amqp, settings.topology, [webhook("slow")])

    async def sleeping() -> bool:
        found: int = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            " AND query LIKE '%INSERT INTO calls%'"
        )
        return found > 0

    await wait_for(sleeping, what="the slow delivery in the database")
    # Callers of their own: they must not wait for the slow one's caller lock.
    behind = [webhook(f"behind-{n}", caller=f"7999100{n:04d}") for n in range(10)]
    await publish(amqp, settings.topology, behind)

    async def behind_stored() -> bool:
        return await stored_calls(db, settings) == 10

    await wait_for(behind_stored, what="the 10 webhooks behind it committed")
    await workers.stop_all()  # returns once the slow one has failed and been handed back
    assert await queue_depth(amqp, settings.topology.call_queue("end")) == 1
