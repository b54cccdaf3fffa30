"""`callpipe subscribe` and `callpipe replay-events` on the real broker and database."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestClient
from callpipe_testing import TcpProxy, wait_for
from conftest import Collector, Services, Workers
from topic_table import TOPIC_TABLE

from callpipe import subscriptions
from infra.broker import work_queue_arguments
from infra.settings import Settings
from schemas import codec
from schemas.topology import HEADER_ROUTING_KEY, topic_matches

Client = TestClient[Any, Any]


async def run_cli(*args: str, settings: Settings) -> tuple[int, str]:
    env = {
        **os.environ,
        "CALLPIPE_AMQP_URL": settings.amqp_url,
        "CALLPIPE_DATABASE_URL": settings.database_url,
        "CALLPIPE_NAMESPACE": settings.namespace,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


@pytest.fixture
async def queues(amqp: AbstractRobustConnection) -> AsyncIterator[list[str]]:
    """Names of queues this test creates; deleted afterwards, whatever the outcome."""
    names: list[str] = []
    try:
        yield names
    finally:
        async with amqp.channel() as channel:
            for name in names:
                await channel.queue_delete(name)


async def drain(
    channel: AbstractChannel, name: str, expected: int
) -> list[AbstractIncomingMessage]:
    """The messages in queue `name` once at least `expected` came, and any more behind them.

    (A passive declare's message count is stale for quorum queues on RabbitMQ 3.10: a marker
    published behind them shows when everything that came before has been read.)
    """
    queue = await channel.get_queue(name, ensure=False)
    messages: list[AbstractIncomingMessage] = []

    async def read() -> AbstractIncomingMessage | None:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            messages.append(message)
        return message

    async def enough() -> bool:
        while await read() is not None:
            pass
        return len(messages) >= expected

    await wait_for(enough, what=f"{expected} messages in {name}")
    marker = f"marker-{uuid.uuid4().hex}"
    await channel.default_exchange.publish(aio_pika.Message(b"", message_id=marker), name)
    await wait_for(lambda: _read_until(read, marker), what=f"the marker in {name}")
    return [message for message in messages if message.message_id != marker]


async def _read_until(read: Any, marker: str) -> bool:
    while (message := await read()) is not None:
        if message.message_id == marker:
            return True
    return False


# --- the matcher agrees with RabbitMQ ------------------------------------------------------


async def test_topic_matcher_agrees_with_rabbitmq(amqp: AbstractRobustConnection) -> None:
    exchange_name = f"cpt_{uuid.uuid4().hex[:12]}.topic-check"
    async with amqp.channel(publisher_confirms=True) as channel:
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC)
        try:
            by_binding = {}
            for binding_key in sorted({row[0] for row in TOPIC_TABLE}):
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.bind(exchange, routing_key=binding_key)
                by_binding[binding_key] = queue
            routing_keys = sorted({row[1] for row in TOPIC_TABLE})
            for routing_key in routing_keys:
                # Confirmed: by then the broker has routed it to every matching queue.
                await exchange.publish(
                    aio_pika.Message(routing_key.encode()), routing_key, mandatory=False
                )
            for binding_key, queue in by_binding.items():
                routed = set()
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    routed.add(message.body.decode())
                expected = {key for key in routing_keys if topic_matches(binding_key, key)}
                assert routed == expected, binding_key
        finally:
            await exchange.delete()


# --- subscribe -----------------------------------------------------------------------------

START = {"caller": "79990009911", "callee": "74951234567", "date": "2026-11-25 10:00:00"}


async def post(
    client: Client, kind: str, call_id: str, token: str = "tok-acme", **extra: Any
) -> None:
    body = {**START, "id": call_id, **extra}
    response = await client.post(f"/roistat/{token}/call-{kind}", data=codec.dumps(body))
    assert response.status == 200, await response.text()


async def test_subscribe_declares_a_queue_that_events_flow_into(
    client: Client,
    settings: Settings,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
) -> None:
    queue_name = f"{settings.namespace}.sub.crm"
    queues.append(queue_name)
    code, output = await run_cli(
        "subscribe", "crm", "--bind", "call.ended.*", "--bind", "call.started", settings=settings
    )
    assert code == 0, output
    assert f"queue {queue_name} declared" in output
    assert "bound to 'call.ended.*'" in output
    assert "bindings from earlier runs are kept" in output
    code, output = await run_cli("subscribe", "crm", "--bind", "call.started", settings=settings)
    assert code == 0, output  # idempotent

    workers.start_both(settings)
    await post(client, "start", "s1")
    await post(client, "end", "s1", status="NOANSWER", duration=0)
    async with amqp.channel() as channel:
        # The same arguments as the work queues: a declaration with them is accepted as is.
        await channel.declare_queue(
            queue_name, durable=True, arguments=work_queue_arguments(settings.topology)
        )
        messages = await drain(channel, queue_name, 2)
        assert sorted(m.routing_key or "" for m in messages) == [
            "call.ended.missed",
            "call.started",
        ]
        assert {m.message_id for m in messages} == {"acme:s1:start", "acme:s1:end"}
        assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)

        # A message its subscriber rejects goes to {ns}.dead.
        await post(client, "start", "s2")
        queue = await channel.get_queue(queue_name, ensure=False)
        message = await wait_for(lambda: queue.get(fail=False), what="one more event")
        await message.reject(requeue=False)
        dead = await channel.get_queue(settings.topology.dead_queue, ensure=False)
        dead_letter = await wait_for(lambda: dead.get(fail=False), what="the dead letter")
        await dead_letter.ack()
        assert dead_letter.message_id == "acme:s2:start"

    code, output = await run_cli("subscribe", "crm", "--unbind", "call.started", settings=settings)
    assert code == 0, output
    assert "unbound from 'call.started'" in output
    await post(client, "start", "s4")
    await post(client, "end", "s4", status="ANSWER", duration=5)
    async with amqp.channel() as channel:
        [message] = await drain(channel, queue_name, 1)
        assert message.message_id == "acme:s4:end"  # no call.started any more


async def test_subscribe_to_a_queue_declared_otherwise_is_a_clear_error(
    settings: Settings, amqp: AbstractRobustConnection, queues: list[str]
) -> None:
    queue_name = settings.topology.subscription_queue("classic")
    queues.append(queue_name)
    async with amqp.channel() as channel:
        await channel.declare_queue(queue_name, durable=True)
    code, output = await run_cli("subscribe", "classic", "--bind", "#", settings=settings)
    assert code == 1
    assert f"queue {queue_name} exists with other settings" in output
    assert "Traceback" not in output


async def test_subscribe_waits_for_the_broker_like_setup() -> None:
    env = {**os.environ, "CALLPIPE_AMQP_URL": "amqp://guest:guest@127.0.0.1:9/"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        "subscribe",
        "crm",
        "--bind",
        "#",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            while b"connecting to the broker as callpipe-subscribe failed" not in (
                line := await process.stderr.readline()
            ):
                assert line, "the command ended instead of waiting"
        assert b"retrying" in line
        assert process.returncode is None  # still waiting
    finally:
        process.kill()
        await process.wait()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["subscribe", "CRM", "--bind", "#"], "name 'CRM' must be 1-32 characters"),
        (["subscribe", "crm.x", "--bind", "#"], "must be 1-32 characters"),
        (["subscribe", "crm"], "give at least one --bind KEY"),
        (["subscribe", "crm", "--bind", "call.*ed"], "'*' and '#' must be whole words"),
        (["subscribe", "crm", "--bind", "call..ended"], "has an empty word"),
        (["subscribe", "crm", "--unbind", ""], "cannot be empty"),
        (["replay-events"], "the following arguments are required: --to"),
        (["replay-events", "--to", "Bad"], "name 'Bad' must be 1-32 characters"),
        (["replay-events", "--to", "sink.Bad"], "name 'Bad' must be 1-32 characters"),
        (["replay-events", "--to", "crm", "--since", "yesterday"], "not an ISO 8601 date"),
        (["replay-events", "--to", "crm", "--until", "25.11.2026"], "not an ISO 8601 date"),
        (
            ["replay-events", "--to", "crm", "--since", "2026-11-25", "--until", "2026-11-25"],
            "--since must be earlier than --until",
        ),
        (["replay-events", "--to", "crm", "--bind", "call.#x"], "must be whole words"),
    ],
)
async def test_argument_errors_are_clear(
    settings: Settings, args: list[str], complaint: str
) -> None:
    code, output = await run_cli(*args, settings=settings)
    assert code == 2, output
    assert complaint in output
    assert "Traceback" not in output


# --- replay-events -------------------------------------------------------------------------


async def store_events(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers
) -> datetime:
    """Seven events, stored and published before anyone subscribed. Returns the time the
    last three begin: when the first of them was received."""
    workers.start_both(settings)
    await post(client, "start", "r1")
    await post(client, "end", "r1", status="ANSWER", duration=35)
    await post(client, "start", "r2")
    await post(client, "end", "r2", status="NOANSWER", duration=0)
    await wait_for(lambda: _published(db, settings, 4), what="the first four events")
    await post(client, "start", "r3", token="tok-beta")
    await post(client, "end", "r4", status="BUSY", duration=0)
    await post(client, "start", "r4")
    await wait_for(lambda: _published(db, settings, 7), what="all seven events")
    boundary: datetime = await db.fetchval(
        f'SELECT received_at FROM "{settings.namespace}".call_events WHERE event_id = $1',
        "beta:r3:start",
    )
    return boundary


async def _published(db: asyncpg.Pool, settings: Settings, n: int) -> bool:
    count = await db.fetchval(
        f'SELECT count(*) FROM "{settings.namespace}".call_events WHERE published_at IS NOT NULL'
    )
    return bool(count == n)


async def stored_order(db: asyncpg.Pool, settings: Settings) -> list[str]:
    rows = await db.fetch(
        f'SELECT event_id FROM "{settings.namespace}".call_events ORDER BY received_at'
    )
    return [row["event_id"] for row in rows]


async def test_a_late_subscription_catches_up_by_replay(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
    subscribe: Any,
) -> None:
    live: Collector = await subscribe(settings.topology.events_exchange, "#")
    await store_events(client, settings, db, workers)
    await live.settle(amqp, settings.topology.events_exchange, "marker")
    originals = {message.message_id: message for message in live.messages}
    assert len(originals) == 7

    queue_name = settings.topology.subscription_queue("late")
    queues.append(queue_name)
    await subscriptions.subscribe(amqp, settings.topology, "late", bind=["call.#"])
    async with amqp.channel() as channel:
        late = await channel.declare_queue(queue_name, passive=True)
        assert late.declaration_result.message_count == 0  # it missed them all

        for _ in range(2):  # a second replay sends each event again, once
            # Two in flight: several batches, so the batches' order shows too.
            report = await subscriptions.replay_events(
                amqp,
                settings.database_url,
                settings.topology,
                "late",
                subscriptions.EventFilter(),
                timeout_s=10,
                in_flight=2,
            )
            assert report.line() == f"replayed 7 events to {queue_name}"
            replayed = await drain(channel, queue_name, 7)
            assert [m.message_id for m in replayed] == await stored_order(db, settings)
            for message in replayed:
                original = originals[message.message_id]
                assert codec.loads(message.body) == codec.loads(original.body)
                assert message.headers[HEADER_ROUTING_KEY] == original.routing_key
                assert message.content_type == "application/json"
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_replay_filters_by_project_time_and_binding_key(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
) -> None:
    boundary = await store_events(client, settings, db, workers)
    queue_name = settings.topology.subscription_queue("filtered")
    queues.append(queue_name)
    await subscriptions.subscribe(amqp, settings.topology, "filtered", bind=["#"])
    cases: list[tuple[list[str], set[str]]] = [
        (["--project", "beta"], {"beta:r3:start"}),
        (
            ["--until", boundary.isoformat()],  # exclusive
            {"acme:r1:start", "acme:r1:end", "acme:r2:start", "acme:r2:end"},
        ),
        (
            ["--since", boundary.isoformat()],  # inclusive
            {"beta:r3:start", "acme:r4:end", "acme:r4:start"},
        ),
        (
            ["--since", boundary.isoformat(), "--project", "acme"],
            {"acme:r4:end", "acme:r4:start"},
        ),
        (["--bind", "call.ended.missed"], {"acme:r2:end", "acme:r4:end"}),
        (
            ["--bind", "call.ended.answered", "--bind", "call.started", "--project", "acme"],
            {"acme:r1:end", "acme:r1:start", "acme:r2:start", "acme:r4:start"},
        ),
        (["--since", "2000-01-01", "--until", "2000-01-02"], set()),
    ]
    async with amqp.channel() as channel:
        for args, expected in cases:
            code, output = await run_cli(
                "replay-events", "--to", "filtered", *args, settings=settings
            )
            assert code == 0, output
            assert f"replayed {len(expected)} events to {queue_name}" in output, args
            replayed = await drain(channel, queue_name, len(expected))
            ids = [message.message_id or "" for message in replayed]
            assert sorted(ids) == sorted(expected), args  # each exactly once


async def test_replay_to_a_missing_queue_fails_and_publishes_nothing(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    for target, queue_name, hint in [
        ("nobody", f"{settings.namespace}.sub.nobody", "callpipe subscribe nobody --bind KEY"),
        ("sink.nobody", f"{settings.namespace}.sink.nobody", "run `callpipe setup`"),
    ]:
        code, output = await run_cli("replay-events", "--to", target, settings=settings)
        assert code == 1, output
        assert f"queue {queue_name} does not exist" in output
        assert hint in output
        assert "Traceback" not in output
        async with amqp.channel() as channel:
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue_name, passive=True)


async def resume_sends_the_rest(
    amqp: AbstractRobustConnection,
    channel: AbstractChannel,
    settings: Settings,
    target: str,
    since: str,
    expected: list[str],
) -> None:
    """A replay from the `--since` a cut-short one printed sends `expected`, in order."""
    report = await subscriptions.replay_events(
        amqp,
        settings.database_url,
        settings.topology,
        target,
        subscriptions.EventFilter(since=datetime.fromisoformat(since)),
        timeout_s=10,
    )
    queue_name = settings.topology.subscription_queue(target)
    assert [m.message_id for m in await drain(channel, queue_name, report.replayed)] == expected


async def test_a_replay_cut_short_says_where_to_resume_and_resuming_sends_the_rest(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
) -> None:
    """The queue refuses publishes once it holds two (a full queue, a broker alarm): the
    replay stops, says from when to run it again, and that run sends every event not sent."""
    await store_events(client, settings, db, workers)
    order = await stored_order(db, settings)
    queue_name = settings.topology.subscription_queue("capped")
    queues.append(queue_name)
    async with amqp.channel() as channel:
        capped = {"x-max-length": 2, "x-overflow": "reject-publish"}
        await channel.declare_queue(queue_name, durable=True, arguments=capped)
        with pytest.raises(subscriptions.SubscriptionError) as cut_short:
            await subscriptions.replay_events(
                amqp,
                settings.database_url,
                settings.topology,
                "capped",
                subscriptions.EventFilter(),
                timeout_s=10,
                in_flight=2,
            )
        message = str(cut_short.value)
        assert "2 events were replayed" in message
        resume = re.search(r"--since (\S+)", message)
        assert resume is not None
        assert [m.message_id for m in await drain(channel, queue_name, 2)] == order[:2]

        await channel.queue_delete(queue_name)
        await channel.declare_queue(queue_name, durable=True)
        # From the first event not confirmed on.
        await resume_sends_the_rest(amqp, channel, settings, "capped", resume.group(1), order[2:])


async def stored_for(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
    target: str,
) -> list[str]:
    """Seven stored events (their ids in the order a replay sends them) and a subscription
    `target` bound to every event, still empty."""
    await store_events(client, settings, db, workers)
    queues.append(settings.topology.subscription_queue(target))
    await subscriptions.subscribe(amqp, settings.topology, target, bind=["#"])
    return await stored_order(db, settings)


async def replay_losing_the_database_at(
    services: Services,
    settings: Settings,
    target: str,
    event_id: str,
) -> subscriptions.ReplayEventsReport | subscriptions.SubscriptionError:
    """Replay every event to `target` two at a time, through links to the broker and the
    database of the test's own; the database link drops while the publish of `event_id`
    is held at the broker link. What the replay returned, or the error it stopped with."""
    broker_link = TcpProxy.in_front_of(services.amqp_url)
    database_link = TcpProxy.in_front_of(services.database_url)
    await broker_link.start()
    await database_link.start()
    connection = await aio_pika.connect_robust(broker_link.route(services.amqp_url))
    try:
        broker_link.freeze_at(event_id.encode())
        replaying = asyncio.create_task(
            subscriptions.replay_events(
                connection,
                database_link.route(settings.database_url),
                settings.topology,
                target,
                subscriptions.EventFilter(),
                timeout_s=10,
                in_flight=2,
            )
        )

        async def held() -> bool:
            return broker_link.held(event_id.encode()) > 0

        await wait_for(held, what=f"the publish of {event_id} at the broker link")
        await database_link.cut()
        broker_link.thaw()
        try:
            return await asyncio.wait_for(replaying, timeout=30)
        except subscriptions.SubscriptionError as exc:
            return exc
    finally:
        await connection.close()
        await broker_link.cut()
        await database_link.cut()


async def test_a_replay_that_loses_the_database_says_where_to_resume(
    client: Client,
    services: Services,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
) -> None:
    """The database goes away after the first batch: the replay says so plainly (no
    traceback) and from when to run it again, and that run sends every event not sent."""
    order = await stored_for(client, settings, db, workers, amqp, queues, "dbloss")
    outcome = await replay_losing_the_database_at(services, settings, "dbloss", order[0])
    assert isinstance(outcome, subscriptions.SubscriptionError), outcome
    message = str(outcome)
    assert message.startswith("lost the database ("), message
    assert "2 events were replayed" in message
    resume = re.search(r"--since (\S+) ", message)
    assert resume is not None, message
    queue_name = settings.topology.subscription_queue("dbloss")
    async with amqp.channel() as channel:
        assert [m.message_id for m in await drain(channel, queue_name, 2)] == order[:2]
        # The next event is unknown: from the last one sent on (again; receivers dedupe).
        await resume_sends_the_rest(amqp, channel, settings, "dbloss", resume.group(1), order[1:])


async def test_a_replay_that_loses_the_database_after_its_last_event_is_done(
    client: Client,
    services: Services,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    queues: list[str],
) -> None:
    """Every event was read before the database went away: the replay is complete."""
    order = await stored_for(client, settings, db, workers, amqp, queues, "lastloss")
    outcome = await replay_losing_the_database_at(services, settings, "lastloss", order[-1])
    assert isinstance(outcome, subscriptions.ReplayEventsReport), outcome
    assert outcome.replayed == len(order)
    async with amqp.channel() as channel:
        queue_name = settings.topology.subscription_queue("lastloss")
        assert [m.message_id for m in await drain(channel, queue_name, len(order))] == order
