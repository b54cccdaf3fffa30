"""`callpipe run` / `ingress` with CALLPIPE_HTTP_PORT taken: one clear line, exit 2, nothing
else started (no connection opened, so none is left behind or half-closed)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiormq
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from cli_process import run_cli
from conftest import TOKENS, Services

from infra.broker import delete_topology
from infra.settings import Settings
from ingress.spool import Spool
from schemas.topology import Topology
from workers.migrate import drop_schema


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def exchange_exists(amqp: AbstractRobustConnection, name: str) -> bool:
    channel = await amqp.channel()
    try:
        await channel.declare_exchange(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    else:
        return True
    finally:
        if not channel.is_closed:
            await channel.close()


@pytest.mark.parametrize("command", ["run", "ingress"])
async def test_a_port_in_use_is_one_line_and_starts_nothing(
    services: Services,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    tmp_path: Path,
    held_port: int,
    command: str,
) -> None:
    namespace = f"cpt_{uuid.uuid4().hex[:12]}"  # not declared: what the command makes shows
    env = {
        "CALLPIPE_AMQP_URL": services.amqp_url,
        "CALLPIPE_DATABASE_URL": services.database_url,
        "CALLPIPE_NAMESPACE": namespace,
        "CALLPIPE_TOKENS": TOKENS,
        "CALLPIPE_HTTP_HOST": "127.0.0.1",
        "CALLPIPE_HTTP_PORT": str(held_port),
        "CALLPIPE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    try:
        code, output = await run_cli(command, env=env, deadline_s=30)
        assert output.splitlines() == [
            f"callpipe: cannot listen on 127.0.0.1:{held_port}: address already in use"
        ]
        assert code == 2
        # Neither the ingress's broker link nor a worker got as far as the broker or database.
        assert not await exchange_exists(amqp, Topology(namespace).webhooks_exchange)
        schema = await db.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", namespace)
        assert schema is None
    finally:
        async with amqp.channel() as channel:
            await delete_topology(channel, Topology(namespace))
        async with db.acquire() as conn:
            await drop_schema(conn, namespace)


async def test_a_spool_directory_in_use_is_one_line_and_exit_2(
    settings: Settings, tmp_path: Path
) -> None:
    """Two ingresses on one spool would send each other's webhooks: the second one refuses."""
    holder = Spool(tmp_path / "spool", 1024 * 1024)
    holder.open()  # another ingress has it
    try:
        env = {
            "CALLPIPE_AMQP_URL": settings.amqp_url,
            "CALLPIPE_NAMESPACE": settings.namespace,
            "CALLPIPE_TOKENS": TOKENS,
            "CALLPIPE_HTTP_HOST": "127.0.0.1",
            "CALLPIPE_HTTP_PORT": str(settings.http_port),
            "CALLPIPE_SPOOL_DIR": str(tmp_path / "spool"),
        }
        code, output = await run_cli("ingress", env=env, deadline_s=30)
    finally:
        holder.close()
    assert code == 2
    assert output.splitlines() == [
        f"callpipe: spool directory {tmp_path / 'spool'} is in use by another process: "
        "give each ingress its own CALLPIPE_SPOOL_DIR"
    ]
