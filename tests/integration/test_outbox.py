"""The outbox relay: committed events go out once, even with two relays at them, and an event
the broker did not confirm stays stored until it does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from callpipe_testing import wait_for
from conftest import Collector
from test_batched_storage import items, received

from infra.broker import connect, declare_topology
from infra.confirmed_publisher import ConfirmedPublisher
from infra.settings import Settings
from workers.events import OutboxEvent, render_outbox
from workers.outbox import OutboxRelay, RelaySettings
from workers.publishing import AmqpEventPublisher
from workers.storage import PostgresCallStore, create_pool


class Relays:
    """Relays of their own (own pool, own confirm channel), as separate workers have."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._close: list[Any] = []

    async def new(self, **overrides: Any) -> OutboxRelay:
        pool = await create_pool(self._settings.database_url, self._settings.namespace, 2)
        connection = await connect(self._settings.amqp_url, name="test-relay")
        self._close += [pool.close, connection.close]
        publisher = await ConfirmedPublisher.open(connection, 5.0)
        events = AmqpEventPublisher(publisher, self._settings.topology)
        return OutboxRelay(pool, events, RelaySettings(**overrides))

    async def close(self) -> None:
        for close in reversed(self._close):
            await close()


@pytest.fixture
async def relays(settings: Settings) -> AsyncIterator[Relays]:
    made = Relays(settings)
    try:
        yield made
    finally:
        await made.close()


async def store(settings: Settings, *call_ids: str) -> list[OutboxEvent]:
    pool = await create_pool(settings.database_url, settings.namespace, 2)
    try:
        stored = await PostgresCallStore(pool).record(
            items(*(received(c) for c in call_ids)), render_outbox
        )
    finally:
        await pool.close()
    return stored.events


async def unpublished(db: asyncpg.Pool, settings: Settings) -> int:
    count: int = await db.fetchval(
        f'SELECT count(*) FROM "{settings.namespace}".call_events WHERE published_at IS NULL'
    )
    return count


async def age(db: asyncpg.Pool, settings: Settings, seconds: int) -> None:
    """Make the stored events look committed `seconds` ago (by a worker that then died)."""
    await db.execute(
        f'UPDATE "{settings.namespace}".call_events '
        f"SET processed_at = processed_at - make_interval(secs => {seconds})"
    )


async def test_two_relays_sweeping_the_same_left_overs_publish_each_event_once(
    settings: Settings, db: asyncpg.Pool, relays: Relays, subscribe: Any, amqp: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    await store(settings, *(f"l{n}" for n in range(120)))
    await age(db, settings, 60)
    first, second = await relays.new(batch_max=16), await relays.new(batch_max=16)
    published = await asyncio.gather(first.sweep(), second.sweep())
    assert sum(published) == 120
    assert await unpublished(db, settings) == 0
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.marker")
    ids = [m.message_id for m in events.messages]
    assert len(ids) == 120 and len(set(ids)) == 120


async def test_a_sweep_leaves_events_young_enough_to_be_their_relays_own(
    settings: Settings, db: asyncpg.Pool, relays: Relays
) -> None:
    await store(settings, "young")
    relay = await relays.new(left_over_after_s=30)
    assert await relay.sweep() == 0
    assert await unpublished(db, settings) == 1


async def test_fresh_events_are_published_and_marked_and_a_second_hand_over_sends_nothing(
    settings: Settings, db: asyncpg.Pool, relays: Relays, subscribe: Any, amqp: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    fresh = await store(settings, "f1", "f2", "f3")
    relay, late = await relays.new(), await relays.new()
    relay.hand_over(fresh)
    await relay.publish_fresh()
    assert await unpublished(db, settings) == 0
    late.hand_over(fresh)  # the same events again, say from a slow second relay: all marked
    await late.publish_fresh()
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.marker")
    assert [m.message_id for m in events.messages] == [e.event_id for e in fresh]
    assert [m.body for m in events.messages] == [e.body for e in fresh]


async def test_an_event_the_broker_did_not_confirm_stays_stored_until_it_does(
    settings: Settings,
    db: asyncpg.Pool,
    relays: Relays,
    amqp: AbstractRobustConnection,
    subscribe: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With `{ns}.events` gone the broker refuses the publishes: nothing is marked, each event
    is named in a warning, and once the exchange is back a sweep sends them."""
    fresh = await store(settings, "n1", "n2")
    async with amqp.channel() as channel:
        await channel.exchange_delete(settings.topology.events_exchange)
    relay = await relays.new(left_over_after_s=0)
    relay.hand_over(fresh)
    await relay.publish_fresh()
    assert await unpublished(db, settings) == 2
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "workers.outbox")
    assert all(f"event {e.event_id} not confirmed" in warned for e in fresh)

    async with amqp.channel() as channel:
        await declare_topology(channel, settings.topology)
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")

    async def swept() -> bool:
        await relay.sweep()
        return await unpublished(db, settings) == 0

    await wait_for(swept, what="the events published once the exchange is back")
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.marker")
    assert sorted(str(m.message_id) for m in events.messages) == sorted(e.event_id for e in fresh)


# A trigger of this test's schema fails the mark (in life: a restart or a failover), either
# at the UPDATE itself (before the publish) or, deferred, at the COMMIT after the confirms.
FAILING_MARK = {
    "at-the-mark": "CREATE TRIGGER no_mark BEFORE UPDATE OF published_at",
    "at-its-commit": "CREATE CONSTRAINT TRIGGER no_mark AFTER UPDATE OF published_at",
}


@pytest.mark.parametrize("where", FAILING_MARK.keys())
async def test_a_mark_that_fails_sends_each_event_once_more_at_most_and_names_it(
    settings: Settings,
    db: asyncpg.Pool,
    relays: Relays,
    amqp: AbstractRobustConnection,
    subscribe: Any,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """The database fails the mark. At the UPDATE, it fails before the publish: nothing goes
    out yet. At the commit, after the broker confirmed: the relay says which events may go
    out twice. Either way the sweep publishes them once the database takes the mark."""
    ns = settings.namespace
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    fresh = await store(settings, "m1", "m2")
    trigger = FAILING_MARK[where]
    deferred = "DEFERRABLE INITIALLY DEFERRED" if where == "at-its-commit" else ""
    await db.execute(
        f"""
        CREATE FUNCTION "{ns}".no_mark() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'database away' USING ERRCODE = '57P01'; END $$;
        {trigger} ON "{ns}".call_events {deferred}
            FOR EACH ROW EXECUTE FUNCTION "{ns}".no_mark();
        """
    )
    relay = await relays.new(left_over_after_s=0)
    relay.hand_over(fresh)
    await relay.publish_fresh()
    assert await unpublished(db, settings) == 2
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "workers.outbox")
    sent_before = where == "at-its-commit"
    for event in fresh:
        assert (f"event {event.event_id} published, not marked" in warned) == sent_before

    await db.execute(f'DROP TRIGGER no_mark ON "{ns}".call_events')
    assert await relay.sweep() == 2
    assert await unpublished(db, settings) == 0
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.marker")
    copies = sorted(str(m.message_id) for m in events.messages)
    # Twice only when the mark failed after the confirm: the crash window.
    assert copies == sorted([e.event_id for e in fresh] * (2 if sent_before else 1))
