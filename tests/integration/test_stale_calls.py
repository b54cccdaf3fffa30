"""Stale calls on the real broker and database: a call start with no call end gets exactly one
`call.stale` event, however many start workers sweep, and across a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestClient
from callpipe_testing import wait_for
from conftest import Collector, Services, Workers, make_settings

from infra.broker import connect
from infra.confirmed_publisher import ConfirmedPublisher
from infra.settings import Settings
from schemas import codec
from schemas.events import CallEvent, CallFields
from workers.end_queue import CallEndQueue
from workers.publishing import AmqpEventPublisher
from workers.stale import build_stale_event
from workers.stale_store import PostgresStaleStore
from workers.storage import create_pool

Client = TestClient[Any, Any]

# Sweeps every 0.2 s; a call is due a minute after its start, which the tests make old by hand.
FAST_SWEEP = {"stale_after_min": 1, "stale_sweep_s": 0.2}


@pytest.fixture
def settings(services: Services, namespace: str) -> Settings:
    return make_settings(services, namespace, **FAST_SWEEP)


async def post(client: Client, kind: str, document: dict[str, Any]) -> None:
    response = await client.post(f"/roistat/tok-acme/call-{kind}", data=codec.dumps(document))
    assert response.status == 200, await response.text()


def start(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "caller": "79990009911", "date": "2026-11-25 10:00:00"}


def end(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "status": "NOANSWER", "duration": 0}


async def wait_published(db: asyncpg.Pool, settings: Settings, *event_ids: str) -> None:
    async def published() -> bool:
        n = await db.fetchval(
            f'SELECT count(*) FROM "{settings.namespace}".call_events'
            " WHERE event_id = ANY($1::text[]) AND published_at IS NOT NULL",
            list(event_ids),
        )
        return bool(n == len(event_ids))

    await wait_for(published, what=f"{len(event_ids)} events published")


async def age_starts(db: asyncpg.Pool, settings: Settings, *call_ids: str) -> None:
    """As if these calls had started two minutes ago: due for the sweep (1 minute)."""
    await db.execute(
        f'UPDATE "{settings.namespace}".calls'
        " SET start_received_at = start_received_at - interval '2 minutes'"
        " WHERE project = 'acme' AND call_id = ANY($1::text[])",
        list(call_ids),
    )


async def wait_events(collector: Collector, n: int, what: str) -> list[dict[str, Any]]:
    async def arrived() -> bool:
        return len(collector.messages) >= n

    await wait_for(arrived, what=what)
    bodies: list[dict[str, Any]] = collector.bodies()
    return bodies


async def stale_rows(db: asyncpg.Pool, settings: Settings) -> dict[str, Any]:
    rows = await db.fetch(
        f'SELECT call_id, stale_at FROM "{settings.namespace}".calls WHERE project = $1', "acme"
    )
    return {row["call_id"]: row["stale_at"] for row in rows}


async def test_starts_without_their_end_become_stale_once_with_two_sweeping_workers(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: AbstractRobustConnection,
    workers: Workers,
    subscribe: Any,
) -> None:
    stale: Collector = await subscribe(settings.topology.events_exchange, "call.stale")
    workers.start(settings, "start")
    workers.start(settings, "start")  # two replicas, both sweeping
    workers.start(settings, "end")
    ids = [f"lonely-{n}" for n in range(30)]
    await asyncio.gather(*(post(client, "start", start(call_id)) for call_id in ids))
    await wait_published(db, settings, *(f"acme:{call_id}:start" for call_id in ids))
    assert not stale.messages  # just started: not due

    await age_starts(db, settings, *ids)
    events = await wait_events(stale, len(ids), "a call.stale event per lonely call")
    await stale.settle(amqp, settings.topology.events_exchange, "call.stale")
    events = stale.bodies()

    assert Counter(event["event_id"] for event in events) == Counter(
        f"acme:{call_id}:stale" for call_id in ids
    )
    assert {message.routing_key for message in stale.messages} == {"call.stale"}
    rows = await stale_rows(db, settings)
    for event in events:
        call = event["call"]
        assert event["type"] == "call.stale"
        assert event["schema"] == "callpipe.call.v1"
        assert event["raw"] == start(call["call_id"])
        assert call["stale_at"] == event["received_at"]
        assert call["end_received_at"] is None and call["revision"] == 1
        assert rows[call["call_id"]] is not None
    stored = await db.fetch(
        f'SELECT kind, published_at FROM "{settings.namespace}".call_events'
        " WHERE event_id LIKE '%:stale'"
    )
    assert len(stored) == len(ids)
    assert all(row["kind"] == "stale" and row["published_at"] for row in stored)


async def test_two_sweeps_at_once_mark_each_call_once(
    client: Client,
    services: Services,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: AbstractRobustConnection,
    workers: Workers,
    subscribe: Any,
) -> None:
    """Two sweeps racing over the same due calls, each with its own pool: one event per call."""
    stale: Collector = await subscribe(settings.topology.events_exchange, "call.stale")
    # This worker stores the starts but never finds them due: the two sweeps below race alone.
    workers.start(make_settings(services, settings.namespace, stale_after_min=10_000), "start")
    ids = [f"race-{n}" for n in range(40)]
    await asyncio.gather(*(post(client, "start", start(call_id)) for call_id in ids))
    await wait_published(db, settings, *(f"acme:{call_id}:start" for call_id in ids))
    await age_starts(db, settings, *ids)

    async with contextlib.AsyncExitStack() as stack:
        connection = await connect(settings.amqp_url, name="test-stale-race")
        stack.push_async_callback(connection.close)
        events = AmqpEventPublisher(
            await ConfirmedPublisher.open(connection, settings.publish_timeout_s),
            settings.topology,
        )
        stores = []
        for _ in range(2):
            pool = await create_pool(settings.database_url, settings.namespace, 2)
            stack.push_async_callback(pool.close)
            stores.append(PostgresStaleStore(pool))

        async def sweep(store: PostgresStaleStore) -> int:
            total = 0
            while marked := await store.mark_stale(1, 7, build_stale_event, events.publish_event):
                total += marked
            return total

        counts = await asyncio.gather(*(sweep(store) for store in stores))

    assert sum(counts) == len(ids)
    await wait_events(stale, len(ids), "a call.stale event per call")
    await stale.settle(amqp, settings.topology.events_exchange, "call.stale")
    assert sorted(message.message_id or "" for message in stale.messages) == sorted(
        f"acme:{call_id}:stale" for call_id in ids
    )


async def test_a_call_with_its_end_is_never_stale(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: AbstractRobustConnection,
    workers: Workers,
    subscribe: Any,
) -> None:
    stale: Collector = await subscribe(settings.topology.events_exchange, "call.stale")
    workers.start_both(settings)
    await post(client, "start", start("ended"))
    await post(client, "end", end("ended"))
    await post(client, "end", end("end-only"))  # a call end alone has no start to age
    await post(client, "start", start("marker"))
    await wait_published(
        db, settings, "acme:ended:start", "acme:ended:end", "acme:end-only:end", "acme:marker:start"
    )
    # Aged together: the sweep that marks the marker has looked at the ended call too.
    await age_starts(db, settings, "ended", "marker")
    await wait_events(stale, 1, "the marker's call.stale event")
    await stale.settle(amqp, settings.topology.events_exchange, "call.stale")

    assert [message.message_id for message in stale.messages] == ["acme:marker:stale"]
    rows = await stale_rows(db, settings)
    assert rows["ended"] is None and rows["end-only"] is None and rows["marker"] is not None


async def test_an_end_after_the_stale_mark_still_gives_its_ended_event(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    await post(client, "start", start("late"))
    await wait_published(db, settings, "acme:late:start")
    await age_starts(db, settings, "late")
    await wait_published(db, settings, "acme:late:stale")
    await post(client, "end", end("late"))
    bodies = await wait_events(events, 3, "started, stale and ended events")

    by_type = {event["type"]: event for event in bodies}
    assert sorted(by_type) == ["call.ended", "call.stale", "call.started"]
    stale_call, ended_call = by_type["call.stale"]["call"], by_type["call.ended"]["call"]
    # The end merges as ever; the row keeps its stale mark, and revision 2 says it is newer.
    assert (ended_call["outcome"], ended_call["revision"]) == ("missed", 2)
    assert ended_call["stale_at"] == stale_call["stale_at"] is not None
    assert ended_call["end_received_at"] is not None
    keys = sorted(message.routing_key or "" for message in events.messages)
    assert keys == ["call.ended.missed", "call.stale", "call.started"]
    row = await db.fetchrow(
        f'SELECT stale_at, end_received_at, revision FROM "{settings.namespace}".calls'
        " WHERE project = 'acme' AND call_id = 'late'"
    )
    assert row is not None
    assert row["stale_at"] is not None and row["end_received_at"] is not None
    assert row["revision"] == 2


async def test_a_restarted_worker_sends_no_second_stale_event(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: AbstractRobustConnection,
    workers: Workers,
    subscribe: Any,
) -> None:
    stale: Collector = await subscribe(settings.topology.events_exchange, "call.stale")
    workers.start_both(settings)
    await post(client, "start", start("once"))
    await wait_published(db, settings, "acme:once:start")
    await age_starts(db, settings, "once")
    await wait_events(stale, 1, "the first call.stale event")

    await workers.stop_all()
    workers.start_both(settings)
    # A later call made stale after the restart: the restarted worker has swept by then.
    await post(client, "start", start("after-restart"))
    await wait_published(db, settings, "acme:after-restart:start")
    await age_starts(db, settings, "after-restart")
    await wait_events(stale, 2, "the call.stale event of a call after the restart")
    await stale.settle(amqp, settings.topology.events_exchange, "call.stale")

    assert sorted(message.message_id or "" for message in stale.messages) == [
        "acme:after-restart:stale",
        "acme:once:stale",
    ]


async def test_call_events_take_the_stale_kind_and_no_other(
    db: asyncpg.Pool, settings: Settings
) -> None:
    insert = (
        f'INSERT INTO "{settings.namespace}".call_events'
        " (event_id, project, call_id, kind, received_at, payload)"
        " VALUES ($1, 'acme', 'k', $2, now(), '{}')"
    )
    await db.execute(insert, "acme:k:stale", "stale")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "acme:k:other", "other")


async def test_calls_whose_end_waits_in_its_queue_are_not_marked(
    client: Client,
    services: Services,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: AbstractRobustConnection,
    workers: Workers,
    subscribe: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`worker end` down for longer than `CALLPIPE_STALE_AFTER_MIN`: the call ends wait in
    `{ns}.call-end` and the starts look stale, but the sweep waits. Once `worker end` is back
    and has caught up, only the call whose end never came is marked."""
    caplog.set_level(logging.DEBUG, logger="workers.stale")
    # A sweep every 2 s: an end handed to `worker end` has that long to be stored.
    slower = make_settings(services, settings.namespace, stale_after_min=1, stale_sweep_s=2.0)
    stale: Collector = await subscribe(settings.topology.events_exchange, "call.stale")
    workers.start(slower, "start")
    await post(client, "start", start("late"))
    await post(client, "start", start("lonely"))
    await wait_published(db, settings, "acme:late:start", "acme:lonely:start")
    await post(client, "end", end("late"))  # no `worker end`: it waits in its queue
    await age_starts(db, settings, "late", "lonely")
    aged_at = len(caplog.records)

    async def held_back_twice() -> bool:
        records = caplog.records[aged_at:]
        waits = [r for r in records if r.getMessage().startswith("stale sweep waits")]
        return len(waits) >= 2

    await wait_for(held_back_twice, what="two sweeps held back after the starts aged")
    assert set((await stale_rows(db, settings)).values()) == {None}

    workers.start(slower, "end")
    await wait_events(stale, 1, "the stale event of the call whose end never came")
    await stale.settle(amqp, settings.topology.events_exchange, "call.stale")
    assert [message.message_id for message in stale.messages] == ["acme:lonely:stale"]
    rows = await stale_rows(db, settings)
    assert rows["late"] is None and rows["lonely"] is not None


async def test_the_end_queue_tells_why_the_sweep_waits(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    queue_name = settings.topology.call_queue("end")
    ends = CallEndQueue(amqp, queue_name)
    assert await ends.why_wait() == f"no worker end consumes {queue_name}"
    async with amqp.channel() as channel:
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(queue_name)
        held: list[AbstractIncomingMessage] = []

        async def hold(message: AbstractIncomingMessage) -> None:
            held.append(message)  # never acked

        await queue.consume(hold)
        assert await ends.why_wait() is None
        for _ in range(2):
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), queue_name)

        async def one_held() -> bool:
            return len(held) == 1 and await ends.why_wait() is not None

        await wait_for(one_held, what="one end held by the consumer, one waiting")
        assert await ends.why_wait() == f"1 call ends wait in {queue_name}"
    missing = CallEndQueue(amqp, f"{settings.namespace}.no-such-queue")
    assert await missing.why_wait() == (
        f"cannot read {settings.namespace}.no-such-queue: ChannelNotFoundEntity"
    )


async def test_a_call_that_fails_holds_back_no_other_and_loses_no_confirm(
    client: Client,
    services: Services,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
) -> None:
    """A call of a sweep's batch fails with an error that is not the broker's (here, its
    event cannot be rendered): the calls before and after it are marked and committed, so
    the next sweep sends them no second event, and the error is raised after the commit."""
    workers.start(make_settings(services, settings.namespace, stale_after_min=10_000), "start")
    ids = ["first", "second", "third"]
    for call_id in ids:  # one at a time: the sweep takes them in this order
        await post(client, "start", start(call_id))
        await wait_published(db, settings, f"acme:{call_id}:start")
    await age_starts(db, settings, *ids)
    sent: list[str] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event["event_id"])

    def render(project: str, call: CallFields, raw: dict[str, Any]) -> CallEvent:
        if call.call_id == "second":
            raise ValueError("a row this version cannot render")
        return build_stale_event(project, call, raw)

    pool = await create_pool(settings.database_url, settings.namespace, 2)
    try:
        store = PostgresStaleStore(pool)
        with pytest.raises(ValueError, match="cannot render"):
            await store.mark_stale(1, 10, render, send)
        assert sent == ["acme:first:stale", "acme:third:stale"]
        rows = await stale_rows(db, settings)
        assert rows["first"] is not None and rows["second"] is None and rows["third"] is not None
        assert await store.mark_stale(1, 10, build_stale_event, send) == 1
    finally:
        await pool.close()
    assert sent == ["acme:first:stale", "acme:third:stale", "acme:second:stale"]
