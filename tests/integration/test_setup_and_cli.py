"""`callpipe setup`, the migrator, the CLI's configuration errors, and `send-sample`."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from aiohttp.test_utils import TestClient
from callpipe_testing import wait_for
from conftest import Collector, Services, Workers

from callpipe.sample import send_sample
from infra.broker import delete_topology
from infra.settings import Settings
from schemas.topology import Topology
from workers.migrate import drop_schema, migrate, migration_files


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


async def test_setup_declares_and_migrates_and_is_idempotent(
    services: Services, amqp: AbstractRobustConnection, db: asyncpg.Pool
) -> None:
    namespace = f"cpt_{uuid.uuid4().hex[:12]}"
    env = {
        "CALLPIPE_AMQP_URL": services.amqp_url,
        "CALLPIPE_DATABASE_URL": services.database_url,
        "CALLPIPE_NAMESPACE": namespace,
    }
    try:
        code, output = await run_cli("setup", env=env)
        assert code == 0, output
        assert "0001_initial" in output
        code, output = await run_cli("setup", env=env)
        assert code == 0, output
        assert "nothing new" in output
        async with amqp.channel() as channel:
            for name in Topology(namespace).work_queues:
                await channel.declare_queue(name, passive=True)
        tables = await db.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", namespace
        )
        assert {r["table_name"] for r in tables} == {
            "calls",
            "call_events",
            "schema_migrations",
            "telegram_alerts",
        }
    finally:
        async with amqp.channel() as channel:
            await delete_topology(channel, Topology(namespace))
        async with db.acquire() as conn:
            await drop_schema(conn, namespace)


async def test_concurrent_migrations_apply_each_file_once(
    services: Services, db: asyncpg.Pool
) -> None:
    namespace = f"cpt_{uuid.uuid4().hex[:12]}"
    connections = [await asyncpg.connect(services.database_url) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrate(conn, namespace) for conn in connections))
        everything = [f.stem for f in migration_files()]
        assert sorted(applied, key=len) == [[], [], [], everything]
    finally:
        for connection in connections:
            await connection.close()
        async with db.acquire() as conn:
            await drop_schema(conn, namespace)


async def test_bad_configuration_is_a_clear_error_not_a_traceback() -> None:
    code, output = await run_cli("worker", "end", env={"CALLPIPE_NAMESPACE": "Bad-Name"})
    assert code == 2
    assert "bad configuration" in output
    assert "namespace" in output
    assert "Traceback" not in output

    code, output = await run_cli("worker", "end", env={"CALLPIPE_LOG_LEVEL": "verbose"})
    assert code == 2
    assert "log level must be one of" in output
    assert "Traceback" not in output

    code, output = await run_cli("ingress", env={"CALLPIPE_TOKENS": ""})
    assert code == 2
    assert "CALLPIPE_TOKENS" in output

    code, output = await run_cli("ingress", env={"CALLPIPE_TOKENS": "no-colon"})
    assert code == 2
    assert "project:token" in output


async def test_send_sample_fills_calls_through_the_pipeline(
    client: TestClient[Any, Any],
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    amqp: AbstractRobustConnection,
    subscribe: Any,
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "#")
    workers.start_both(settings)
    url = str(client.make_url("/roistat/tok-acme"))
    report = await send_sample(url, 25, seed=7, duplicate_ratio=0.3)
    assert set(report.statuses) == {"200"}
    assert report.webhooks == 50 + report.duplicates
    assert report.duplicates > 0

    async def all_merged() -> bool:
        count = await db.fetchval(
            f'SELECT count(*) FROM "{settings.namespace}".calls'
            " WHERE start_received_at IS NOT NULL AND end_received_at IS NOT NULL"
            " AND caller LIKE '+7999%' AND outcome IS NOT NULL AND called_at IS NOT NULL"
        )
        return bool(count == 25)

    await wait_for(all_merged, seconds=30, what="25 merged sample calls")

    # The relay publishes after the commit: the last events may be a moment behind the rows.
    async def published() -> int:
        count: int = await db.fetchval(
            f'SELECT count(*) FROM "{settings.namespace}".call_events'
            " WHERE published_at IS NOT NULL"
        )
        return count

    async def all_published() -> bool:
        return await published() >= 50

    await wait_for(all_published, what="50 events published")
    await events.settle(amqp, settings.topology.events_exchange, "marker")
    # One event per distinct webhook: the duplicates sent none.
    ids = [message.message_id for message in events.messages]
    assert len(ids) == len(set(ids)) == 50


async def test_replay_dead_command_reports_what_it_did(settings: Settings) -> None:
    code, output = await run_cli(
        "replay-dead",
        env={"CALLPIPE_AMQP_URL": settings.amqp_url, "CALLPIPE_NAMESPACE": settings.namespace},
    )
    assert code == 0, output
    assert "replayed 0 dead letters" in output


async def test_send_sample_to_nowhere_is_a_clear_error() -> None:
    code, output = await run_cli(
        "send-sample", "--url", "http://127.0.0.1:9/roistat/x", "--calls", "1", env={}
    )
    assert code == 1
    assert "cannot post to http://127.0.0.1:9/roistat/x" in output
    assert "Traceback" not in output
