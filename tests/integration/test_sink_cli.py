"""`callpipe setup`, `run` and `sinks` with a sinks file, as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from callpipe_testing import wait_for
from conftest import free_port
from sink_testing import FakeServer, envelope, new_secret, publish_events
from standardwebhooks.webhooks import Webhook
from test_setup_and_cli import run_cli

from infra.settings import Settings
from schemas import codec
from sinks.registry import load_sinks
from sinks.topology import delay_queue, delete_sink


class Inbox:
    """A destination that keeps what it is sent and answers with `status`."""

    def __init__(self, secret: str) -> None:
        self.verifier = Webhook(secret)
        self.events: list[dict[str, Any]] = []
        self.status = 200

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.events.append(self.verifier.verify(await request.read(), dict(request.headers)))
        return web.Response(status=self.status)


@pytest.fixture
async def inbox(
    tmp_path: Path, settings: Settings, amqp: AbstractRobustConnection
) -> AsyncIterator[tuple[Inbox, dict[str, str]]]:
    """A webhook destination, a sinks file naming it, and the environment for a process."""
    secret = new_secret()
    fake = Inbox(secret)
    server = FakeServer(fake.handle)
    url = await server.start()
    sinks_file = tmp_path / "sinks.toml"
    sinks_file.write_text(
        f'[[webhook]]\nname = "crm"\nurl = "{url}/in"\nsecret = "{secret}"\n'
        'events = ["call.ended.*"]\nretry_delays_s = [0.2]\n',
        encoding="utf-8",
    )
    env = {
        "CALLPIPE_AMQP_URL": settings.amqp_url,
        "CALLPIPE_DATABASE_URL": settings.database_url,
        "CALLPIPE_NAMESPACE": settings.namespace,
        "CALLPIPE_SINKS_FILE": str(sinks_file),
        "CALLPIPE_TOKENS": "acme:tok-acme",
        "CALLPIPE_HTTP_HOST": "127.0.0.1",
        "CALLPIPE_HTTP_PORT": str(free_port()),
        "CALLPIPE_SPOOL_DIR": str(settings.spool_path),
        "CALLPIPE_DRAIN_S": "0",
    }
    try:
        yield fake, env
    finally:
        await server.stop()
        async with amqp.channel() as channel:
            for config in load_sinks(sinks_file):
                await delete_sink(channel, settings.topology, config)


async def start_process(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def stop_process(process: asyncio.subprocess.Process) -> tuple[int, str]:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode or 0, output.decode()


async def test_setup_declares_the_sinks_queues_and_events_wait_there(
    settings: Settings, amqp: AbstractRobustConnection, inbox: tuple[Inbox, dict[str, str]]
) -> None:
    fake, env = inbox
    code, output = await run_cli("setup", env=env)
    assert code == 0, output
    assert f"sink queue '{settings.namespace}.sink.crm' bound to call.ended.*" in output
    # Nothing runs the sink yet: the event waits in its queue.
    await publish_events(amqp, settings, [envelope("w1"), envelope("w2", outcome=None)])
    async with amqp.channel() as channel:
        await channel.declare_queue(delay_queue(settings.topology, "crm", 0.2), passive=True)
        queue = await channel.declare_queue(settings.topology.sink_queue("crm"), passive=True)
        assert queue.declaration_result.message_count == 1  # call.started is not bound

        async def waiting() -> Any:
            return await queue.get(fail=False)

        message = await wait_for(waiting, what="the event in the sink's queue")
        await message.nack(requeue=True)
    assert codec.loads(message.body)["event_id"] == "acme:w1:end"  # call.started is not bound

    process = await start_process("sinks", "--only", "crm", env=env)
    try:

        async def delivered() -> bool:
            return [event["event_id"] for event in fake.events] == ["acme:w1:end"]

        await wait_for(delivered, what="the waiting event delivered")
    finally:
        code, output = await stop_process(process)
    assert code == 0, output
    assert "sinks stopped" in output


async def test_run_delivers_a_missed_call_to_the_webhook_sink(
    inbox: tuple[Inbox, dict[str, str]],
) -> None:
    fake, env = inbox
    assert (await run_cli("setup", env=env))[0] == 0
    process = await start_process("run", env=env)
    base = f"http://127.0.0.1:{env['CALLPIPE_HTTP_PORT']}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"{base}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, seconds=30, what="the ingress ready")
            body = codec.dumps({"id": "r1", "caller": "79990009911", "status": "NOANSWER"})
            async with session.post(f"{base}/roistat/tok-acme/call-end", data=body) as response:
                assert response.status == 200

        async def delivered() -> bool:
            return len(fake.events) == 1

        await wait_for(delivered, seconds=30, what="the event at the destination")
    finally:
        code, output = await stop_process(process)
    assert code == 0, output
    event = fake.events[0]
    assert event["event_id"] == "acme:r1:end"
    assert event["call"]["caller"] == "+79990009911" and event["call"]["outcome"] == "missed"


async def test_trying_a_destination_from_the_command_line(
    inbox: tuple[Inbox, dict[str, str]],
) -> None:
    fake, env = inbox
    code, output = await run_cli("sinks", "--test", "crm", env=env)
    assert code == 0, output
    assert "sink 'crm': delivered a sample missed call" in output
    assert fake.events[0]["project"] == "callpipe-test"
    fake.status = 410
    code, output = await run_cli("sinks", "--test", "crm", env=env)
    assert code == 1
    assert "refused (final): HTTP 410" in output


async def test_sinks_command_errors_are_clear(
    tmp_path: Path, inbox: tuple[Inbox, dict[str, str]]
) -> None:
    _, env = inbox
    code, output = await run_cli("sinks", "--only", "nope", env=env)
    assert code == 2
    assert "no sink named 'nope'" in output and "known: crm" in output
    bad = tmp_path / "bad.toml"
    bad.write_text('[[webhook]]\nname = "crm"\nurl = "http://x"\nsecret = "oops"\n')
    for command in ("setup", "run", "sinks"):
        code, output = await run_cli(command, env={**env, "CALLPIPE_SINKS_FILE": str(bad)})
        assert code == 2, (command, output)
        assert f"sinks file {bad}, [[webhook]] #1: secret" in output
        assert "oops" not in output and "Traceback" not in output
    code, output = await run_cli(
        "sinks", env={**env, "CALLPIPE_SINKS_FILE": str(tmp_path / "absent.toml")}
    )
    assert code == 2 and "cannot read it" in output


async def test_a_new_secret_is_a_valid_one() -> None:
    code, output = await run_cli("sinks", "--new-secret", env={})
    assert code == 0
    secret = output.strip()
    assert secret.startswith("whsec_")
    Webhook(secret)  # the library reads it back
