"""The bounds of `{ns}.dead` and `{ns}.rejected`, for new installs and for existing ones, and
reading them as often as one likes without moving or losing a message."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp.test_utils import TestClient, TestServer
from callpipe_testing import wait_for
from conftest import Services, Workers, make_settings

from callpipe.dead_operations import KeptQueue, list_letters, purge_letters
from callpipe.queue_scan import REFRESH_AT
from infra.broker import declare_topology, delete_topology, work_queue_arguments
from infra.kept_queues import KeptQueueBounds
from infra.settings import Settings
from ingress.app import BROKER, init_app
from schemas import codec
from schemas.topology import Topology
from workers.migrate import drop_schema, migrate

TINY = KeptQueueBounds.of(3, 0, 2, 0)
Namespaces = Callable[..., Awaitable[Settings]]


@pytest.fixture
async def namespaces(
    services: Services, amqp: AbstractRobustConnection, db: asyncpg.Pool
) -> AsyncIterator[Namespaces]:
    """`await namespaces(bounds=..., legacy=False)`: a fresh namespace, removed after the test.
    `legacy`: its dead and rejected queues as callpipe declared them before they had bounds."""
    made: list[str] = []

    async def make(bounds: KeptQueueBounds = TINY, legacy: bool = False) -> Settings:
        name = f"cpt_{uuid.uuid4().hex[:12]}"
        made.append(name)
        topology = Topology(name)
        async with amqp.channel() as channel:
            if legacy:
                await channel.declare_queue(
                    topology.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
                )
                await channel.declare_queue(
                    topology.rejected_queue,
                    durable=True,
                    arguments=work_queue_arguments(topology),
                )
            await declare_topology(channel, topology, bounds)
        async with db.acquire() as conn:
            await migrate(conn, name)
        return make_settings(services, name)

    try:
        yield make
    finally:
        for name in made:
            async with amqp.channel() as channel:
                await delete_topology(channel, Topology(name))
            async with db.acquire() as conn:
                await drop_schema(conn, name)


async def publish(
    amqp: AbstractRobustConnection, exchange: str, routing_key: str, body: bytes, **kw: Any
) -> bool:
    """True if the broker confirmed the message, False if it refused it."""
    async with amqp.channel() as channel:
        target = await channel.get_exchange(exchange)
        try:
            await target.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **kw),
                routing_key,
            )
        except aio_pika.exceptions.DeliveryError:
            return False
    return True


async def reasons(amqp: AbstractRobustConnection, kept: KeptQueue) -> list[str]:
    rows = (await list_letters(amqp, kept, timeout_s=10)).rows
    return [row.reason for row in rows]


async def fill_dead(amqp: AbstractRobustConnection, topology: Topology) -> int:
    """Publish numbered dead letters until the bound refuses one; how many were kept."""
    for number in range(10):
        headers = {"x-callpipe-error": f"letter {number}"}
        if not await publish(amqp, topology.dead_exchange, "x", b"{}", headers=headers):
            return number
    raise AssertionError("the dead queue took 10 messages with a bound of 3")


async def test_at_its_bound_dead_refuses_more_and_keeps_what_it_has(
    namespaces: Namespaces, amqp: AbstractRobustConnection
) -> None:
    settings = await namespaces()
    kept = await fill_dead(amqp, settings.topology)
    # RabbitMQ accepts the publish that crosses the bound, then refuses.
    assert kept in (3, 4)
    dead = KeptQueue("dead", settings.topology)
    assert await reasons(amqp, dead) == [f"letter {n}" for n in range(kept)]


async def test_a_worker_keeps_a_poison_message_while_dead_is_full_and_delivers_it_later(
    namespaces: Namespaces,
    amqp: AbstractRobustConnection,
    workers: Workers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = await namespaces()
    topology = settings.topology
    await fill_dead(amqp, topology)
    caplog.set_level(logging.WARNING, logger="workers")
    workers.start(settings, "end")
    poison = codec.dumps({"id": "p1"})  # no project header: a worker can never store it
    assert await publish(
        amqp, topology.webhooks_exchange, "roistat.call.end", poison, message_id="x:p1:end"
    )

    async def refused() -> bool:
        # A permanent error is retried only when its dead letter was refused.
        retried = "retrying: missing header x-callpipe-project"
        return any(retried in record.getMessage() for record in caplog.records)

    await wait_for(refused, what="the worker's dead letter refused by the full dead queue")
    dead = KeptQueue("dead", topology)
    rows = (await list_letters(amqp, dead, timeout_s=10)).rows
    fillers = {row.id for row in rows if row.reason.startswith("letter ")}
    outcome = await purge_letters(amqp, dead, fillers, None, timeout_s=10)
    assert len(outcome.purged) == len(fillers)

    async def arrived() -> bool:
        return any("x-callpipe-project" in reason for reason in await reasons(amqp, dead))

    await wait_for(arrived, seconds=60, what="the poison message in dead once there was room")


async def test_at_its_bound_rejected_drops_the_oldest_and_the_ingress_still_answers(
    namespaces: Namespaces, amqp: AbstractRobustConnection
) -> None:
    settings = await namespaces()
    topology = settings.topology
    for number in range(4):
        headers = {"x-callpipe-reject-reason": f"body {number}"}
        assert await publish(
            amqp, topology.webhooks_exchange, "roistat.rejected", b"junk", headers=headers
        )
    rejected = KeptQueue("rejected", topology)
    assert await reasons(amqp, rejected) == ["body 2", "body 3"]

    app = init_app(settings)
    async with TestClient(TestServer(app)) as client:
        await asyncio.wait_for(app[BROKER].wait_ready(), timeout=10)
        response = await client.post("/roistat/tok-acme/call-end", data=b"not json")
        assert response.status == 400
    assert await reasons(amqp, rejected) == ["body 3", "not_json"]
    assert await reasons(amqp, KeptQueue("dead", topology)) == []


async def test_reading_many_times_never_brings_a_message_to_a_delivery_limit(
    namespaces: Namespaces, amqp: AbstractRobustConnection
) -> None:
    """The old `{ns}.rejected` has a delivery limit of 20 and dead-letters to `{ns}.dead`:
    listing it 25 times (get and return, each raising the count on RabbitMQ 3.x) must leave
    the message where it is, with the same id."""
    settings = await namespaces(legacy=True)
    topology = settings.topology
    assert await publish(
        amqp,
        topology.webhooks_exchange,
        "roistat.rejected",
        b"junk",
        headers={"x-callpipe-reject-reason": "not_json"},
    )
    rejected = KeptQueue("rejected", topology)
    [first] = (await list_letters(amqp, rejected, timeout_s=10)).rows
    for _ in range(REFRESH_AT + 15):
        [row] = (await list_letters(amqp, rejected, timeout_s=10)).rows
        assert row.id == first.id
    assert await reasons(amqp, KeptQueue("dead", topology)) == []


async def test_an_existing_install_keeps_working_and_setup_prints_the_policy(
    namespaces: Namespaces, amqp: AbstractRobustConnection, services: Services
) -> None:
    settings = await namespaces(legacy=True)
    # Re-declaring with bounds must not fail (RabbitMQ would refuse other arguments) ...
    async with amqp.channel() as channel:
        await declare_topology(channel, settings.topology, TINY)
        await channel.declare_queue(settings.topology.dead_queue, passive=True)
    # ... and `setup` says how to bound the old queues.
    output = await setup_output(settings)
    assert f"queue '{settings.topology.dead_queue}' was declared before it had a bound" in output
    policy = f"{settings.namespace}-dead-bound '^{settings.namespace}\\.dead$'"
    assert f"rabbitmqctl set_policy -p '/' --apply-to queues --priority 10 {policy}" in output
    assert "recreating the queue avoids that" in output


async def setup_output(settings: Settings, **env: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        "setup",
        env={
            **os.environ,
            "CALLPIPE_AMQP_URL": settings.amqp_url,
            "CALLPIPE_DATABASE_URL": settings.database_url,
            "CALLPIPE_NAMESPACE": settings.namespace,
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    return output.decode()


async def run(*command: str) -> tuple[int, str]:
    """A command's exit code and output; 127 if it cannot be started."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return 127, str(exc)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


async def rabbitmqctl_sees(queue: str) -> bool:
    """Whether a local rabbitmqctl manages the test broker (not so with a container)."""
    if shutil.which("rabbitmqctl") is None:
        return False
    code, output = await run("rabbitmqctl", "list_queues", "-p", "/", "name")
    return code == 0 and queue in output.split()


async def test_the_printed_policy_bounds_an_existing_dead_queue(
    namespaces: Namespaces, amqp: AbstractRobustConnection
) -> None:
    settings = await namespaces(legacy=True)
    topology = settings.topology
    if not await rabbitmqctl_sees(topology.dead_queue):
        pytest.skip("no local rabbitmqctl manages the test broker: the policy is not tried")
    output = await setup_output(
        settings, CALLPIPE_DEAD_MAX_MESSAGES="3", CALLPIPE_DEAD_MAX_BYTES="0"
    )
    [command] = [
        line.strip() for line in output.splitlines() if f"{settings.namespace}-dead-bound" in line
    ]
    policy = f"{settings.namespace}-dead-bound"
    try:
        code, said = await run("bash", "-c", command)
        assert code == 0, said

        async def bounded() -> bool:
            # A policy takes effect a moment after it is set: until then, publishes pass.
            return await fill_dead_or_none(amqp, topology) is not None

        await wait_for(bounded, what="the policy's bound refusing publishes")
    finally:
        await run("rabbitmqctl", "clear_policy", "-p", "/", policy)


async def fill_dead_or_none(amqp: AbstractRobustConnection, topology: Topology) -> int | None:
    try:
        return await fill_dead(amqp, topology)
    except AssertionError:
        return None
