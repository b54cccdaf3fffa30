"""`callpipe dead ...`, `callpipe rejected ...` and `replay-dead` on the real broker."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestClient
from callpipe_testing import wait_for
from conftest import Workers

from callpipe.dead_operations import (
    KeptQueue,
    list_letters,
    purge_letters,
    requeue_letters,
)
from callpipe.letters import Letter
from callpipe.queue_scan import QueueScan
from infra.broker import plain_headers, work_queue_arguments
from infra.settings import Settings
from schemas import codec
from schemas.topology import HEADER_ATTEMPT, HEADER_SINK, Topology

RAW_PHONES = ("79990009911", "74950001122", "79990001234", "79991112233")
SINK = "crm"


async def run_cli(settings: Settings, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "CALLPIPE_AMQP_URL": settings.amqp_url,
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


def webhook_body(call_id: str) -> bytes:
    return codec.dumps(
        {"id": call_id, "caller": "79990009911", "callee": "74950001122", "status": "ANSWER"}
    )


async def seed_dead(
    amqp: AbstractRobustConnection, topology: Topology, *, received_days_ago: float = 0
) -> None:
    """Four dead letters, one of each origin, in this order: a worker's, the broker's (a
    rejected delivery), a sink's, and junk nobody can requeue."""
    received = (datetime.now(UTC) - timedelta(days=received_days_ago)).isoformat()
    ingress_headers: dict[str, Any] = {
        "x-callpipe-project": "acme",
        "x-callpipe-kind": "end",
        "x-callpipe-received-at": received,
    }
    async with amqp.channel() as channel:
        dead = await channel.get_exchange(topology.dead_exchange)
        webhooks = await channel.get_exchange(topology.webhooks_exchange)
        await dead.publish(
            aio_pika.Message(
                webhook_body("w1"),
                message_id="acme:w1:end",
                headers={**ingress_headers, "x-callpipe-error": "PermanentError: 79990009911?"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            "roistat.call.end",
        )
        # The broker dead-letters a delivery that is rejected without requeue.
        await webhooks.publish(
            aio_pika.Message(
                webhook_body("b1"),
                message_id="acme:b1:end",
                headers=ingress_headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            "roistat.call.end",
        )
        queue = await channel.get_queue(topology.call_queue("end"))
        delivered = await wait_for(lambda: queue.get(fail=False), what="the webhook to reject")
        await delivered.reject(requeue=False)
        await wait_for(lambda: _depth(amqp, topology.dead_queue, 2), what="the broker's letter")
        event = {
            "event_id": "acme:s1:end",
            "received_at": received,
            "project": "acme",
            "call": {"call_id": "s1", "caller": "+79990001234", "outcome": "missed"},
            "raw": {"id": "s1", "caller": "79990001234"},
        }
        await dead.publish(
            aio_pika.Message(
                codec.dumps(event),
                message_id="acme:s1:end",
                headers={
                    "x-callpipe-routing-key": "call.ended.missed",
                    HEADER_ATTEMPT: 7,
                    HEADER_SINK: SINK,
                    "x-callpipe-error": "HTTP 410 Gone",
                },
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            "call.ended.missed",
        )
        await dead.publish(
            aio_pika.Message(
                b"junk from 79991112233", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            "something.else",
        )


async def _depth(amqp: AbstractRobustConnection, name: str, at_least: int) -> bool:
    return await depth(amqp, name) >= at_least


async def depth(amqp: AbstractRobustConnection, name: str) -> int:
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


async def take_all(amqp: AbstractRobustConnection, name: str) -> list[AbstractIncomingMessage]:
    found = []
    async with amqp.channel() as channel:
        queue = await channel.get_queue(name)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            found.append(message)
    return found


@pytest.fixture
async def sink_queue(amqp: AbstractRobustConnection, settings: Settings) -> AsyncIterator[str]:
    """A sink's queue, as `callpipe setup` declares it; removed after the test."""
    name = settings.topology.sink_queue(SINK)
    async with amqp.channel() as channel:
        await channel.declare_queue(
            name, durable=True, arguments=work_queue_arguments(settings.topology)
        )
    try:
        yield name
    finally:
        async with amqp.channel() as channel:
            await channel.queue_delete(name)


def dead(settings: Settings) -> KeptQueue:
    return KeptQueue("dead", settings.topology)


async def listed(amqp: AbstractRobustConnection, kept: KeptQueue) -> list[Any]:
    return (await list_letters(amqp, kept, timeout_s=10)).rows


async def test_dead_list_and_show_mask_phones_and_leave_the_queue_as_it_was(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    await seed_dead(amqp, settings.topology)
    code, output = await run_cli(settings, "dead", "list")
    assert code == 0, output
    lines = output.strip().splitlines()
    assert lines[0].split() == ["ID", "AGE", "SOURCE", "CALL", "PHONES", "REASON"]
    assert lines[-1] == f"4 dead letters in {settings.topology.dead_queue}"
    rows = [line.split(maxsplit=5) for line in lines[1:-1]]
    assert [(r[2], r[3]) for r in rows] == [
        (settings.topology.call_queue("end"), "w1"),
        (settings.topology.call_queue("end"), "b1"),
        ("sink:crm", "s1"),
        ("?", "-"),
    ]
    assert rows[0][4] == "7999*****11,7495*****22"
    assert rows[0][5] == "PermanentError: 7999*****11?"
    assert rows[1][5] == "broker: rejected"
    assert rows[3][4] == "7999*****33"
    assert not any(phone in output for phone in RAW_PHONES)

    # Listing again shows the same ids in the same order: nothing moved, nothing lost.
    again = [row.id for row in await listed(amqp, dead(settings))]
    assert again == [r[0] for r in rows]

    code, output = await run_cli(settings, "dead", "show", rows[2][0])
    assert code == 0, output
    assert "source:      sink:crm" in output
    assert '"caller": "+799******34"' in output
    assert "x-callpipe-sink" in output
    assert not any(phone in output for phone in RAW_PHONES)
    code, output = await run_cli(settings, "dead", "show", rows[2][0], "--unmasked")
    assert code == 0, output
    assert "79990001234" in output

    code, output = await run_cli(settings, "dead", "show", "0123456789ab")
    assert code == 1
    assert "no message with id 0123456789ab" in output
    assert await depth(amqp, settings.topology.dead_queue) == 4


async def test_requeue_of_one_id_sends_a_sinks_event_back_with_its_attempts_reset(
    settings: Settings, amqp: AbstractRobustConnection, sink_queue: str
) -> None:
    await seed_dead(amqp, settings.topology)
    before = await listed(amqp, dead(settings))
    [sink_id] = [row.id for row in before if row.source == "sink:crm"]

    code, output = await run_cli(settings, "dead", "requeue", sink_id)
    assert code == 0, output
    assert f"requeued {sink_id}" in output

    [event] = await take_all(amqp, sink_queue)
    assert codec.loads(event.body)["event_id"] == "acme:s1:end"
    assert event.message_id == "acme:s1:end"
    headers = plain_headers(event.headers)
    assert headers["x-callpipe-routing-key"] == "call.ended.missed"
    assert "x-callpipe-requeued-at" in headers
    for gone in (HEADER_ATTEMPT, HEADER_SINK, "x-callpipe-error"):
        assert gone not in headers
    after = [row.id for row in await listed(amqp, dead(settings))]
    assert after == [row.id for row in before if row.id != sink_id]


async def test_requeue_all_sends_webhooks_to_the_workers_and_events_to_the_sink(
    settings: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
    sink_queue: str,
) -> None:
    await seed_dead(amqp, settings.topology)
    outcome = await requeue_letters(amqp, dead(settings), None, timeout_s=10)
    assert (len(outcome.requeued), len(outcome.kept), outcome.failed) == (3, 1, [])
    assert "not a call webhook" in outcome.kept[0][1]
    [junk] = await listed(amqp, dead(settings))
    assert junk.source == "?"
    assert len(await take_all(amqp, sink_queue)) == 1

    workers.start(settings, "end")

    async def both_stored() -> bool:
        ids = await db.fetch(f'SELECT call_id FROM "{settings.namespace}".calls')
        return {r["call_id"] for r in ids} == {"w1", "b1"}

    await wait_for(both_stored, what="the requeued webhooks stored")


async def test_purge_removes_only_what_is_selected(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    await seed_dead(amqp, settings.topology, received_days_ago=9)  # all but junk are old
    await seed_dead(amqp, settings.topology)  # and again, fresh
    rows = await listed(amqp, dead(settings))
    assert len(rows) == 8

    code, output = await run_cli(settings, "dead", "purge", "--older-than", "7d")
    assert code == 0, output
    # The broker's letter died just now (x-death), whenever it was received.
    assert "purged 2 of 8 dead letters; 2 of unknown age kept" in output
    left = await listed(amqp, dead(settings))
    assert [row.call_id for row in left] == ["b1", "-", "w1", "b1", "s1", "-"]

    junk = [row.id for row in left if row.source == "?"]
    outcome = await purge_letters(amqp, dead(settings), set(junk), None, timeout_s=10)
    assert outcome.purged == junk  # both copies of the junk: one id
    assert [row.call_id for row in await listed(amqp, dead(settings))] == ["b1", "w1", "b1", "s1"]

    code, output = await run_cli(settings, "dead", "purge")
    assert code == 2
    assert "--older-than" in output


async def test_rejected_requeue_revalidates_and_keeps_what_is_still_invalid(
    client: TestClient[Any, Any],
    settings: Settings,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    workers: Workers,
) -> None:
    topology = settings.topology
    response = await client.post(
        "/roistat/tok-acme", data=b'[{"id": "1", "caller": "79990009911"}]'
    )
    assert response.status == 422
    # As an older ingress rejected it: a body the ingress accepts today.
    async with amqp.channel() as channel:
        webhooks = await channel.get_exchange(topology.webhooks_exchange)
        await webhooks.publish(
            aio_pika.Message(
                webhook_body("r1"),
                message_id="acme:rejected:1",
                headers={
                    "x-callpipe-project": "acme",
                    "x-callpipe-received-at": datetime.now(UTC).isoformat(),
                    "x-callpipe-remote-addr": "10.1.2.3",
                    "x-callpipe-reject-reason": "missing_id",
                },
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            "roistat.rejected",
        )
    await wait_for(lambda: _depth(amqp, topology.rejected_queue, 2), what="two rejected bodies")

    code, output = await run_cli(settings, "rejected", "list")
    assert code == 0, output
    lines = output.strip().splitlines()
    assert lines[0].split() == ["ID", "AGE", "PROJECT", "CALL", "PHONES", "REASON"]
    assert [[*line.split()[2:4], line.split()[-1]] for line in lines[1:3]] == [
        ["acme", "-", "not_object"],
        ["acme", "r1", "missing_id"],
    ]
    assert "7999*****11" in lines[1]
    assert not any(phone in output for phone in RAW_PHONES)
    invalid_id = lines[1].split()[0]
    code, output = await run_cli(settings, "rejected", "show", invalid_id)
    assert code == 0, output
    assert "7999*****11" in output and "79990009911" not in output

    workers.start_both(settings)
    code, output = await run_cli(settings, "rejected", "requeue", "--all")
    assert code == 0, output
    assert f"kept {invalid_id}: still invalid (not_object)" in output
    assert "requeued 1 of 2 rejected bodies; kept 1; failed 0" in output

    async def stored() -> Any:
        return await db.fetchrow(
            f'SELECT status, end_received_at FROM "{settings.namespace}".calls'
            " WHERE project = 'acme' AND call_id = 'r1'"
        )

    row = await wait_for(stored, what="the revalidated call stored as a call end")
    assert row["status"] == "ANSWER" and row["end_received_at"] is not None
    [left] = await listed(amqp, KeptQueue("rejected", topology))
    assert left.id == invalid_id

    code, output = await run_cli(settings, "rejected", "requeue", invalid_id)
    assert code == 1
    assert "still invalid" in output


async def test_replay_dead_is_dead_requeue_all(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    await seed_dead(amqp, settings.topology)
    code, output = await run_cli(settings, "replay-dead")
    assert code == 0, output
    # No sink queue in this namespace: the sink's event stays, with the junk.
    assert "replayed 2 dead letters; kept 2 that cannot be requeued" in output
    replayed = await take_all(amqp, settings.topology.call_queue("end"))
    assert sorted(m.message_id or "" for m in replayed) == ["acme:b1:end", "acme:w1:end"]
    assert all("x-callpipe-error" not in (m.headers or {}) for m in replayed)
    assert [row.source for row in await listed(amqp, dead(settings))] == ["sink:crm", "?"]


async def test_a_namespace_without_the_queue_is_a_clear_error(settings: Settings) -> None:
    code, output = await run_cli(
        settings.model_copy(update={"namespace": "cpt_nothing_here"}), "dead", "list"
    )
    assert code == 2
    assert "does not exist" in output and "CALLPIPE_NAMESPACE=cpt_nothing_here" in output


async def test_a_queue_longer_than_the_prefetch_is_read_on_with_get_in_order(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    """Past AMQP's largest prefetch (65535) a scan goes on with basic.get: tried with 2."""
    for _ in range(2):
        await seed_dead(amqp, settings.topology)
    expected = [row.id for row in await listed(amqp, dead(settings))]
    seen: list[str] = []

    async def note(letter: Letter) -> None:
        seen.append(letter.id)

    async with QueueScan(amqp, settings.topology.dead_queue, timeout_s=10, prefetch=2) as scan:
        await scan.each(note)
    assert seen == expected and len(seen) == 8
    assert scan.result.returned == 8
    assert [row.id for row in await listed(amqp, dead(settings))] == expected
