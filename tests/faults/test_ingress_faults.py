"""The ingress when the broker goes away, hangs, or was never there; and its graceful stop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestClient, TestServer
from callpipe_testing import TcpProxy, stalled_spool_disk, take_queued, wait_for
from conftest import Services, make_settings

from infra.broker import delete_topology
from infra.settings import Settings
from ingress.app import BROKER, SPOOL, init_app
from schemas import codec
from schemas.topology import Topology

CALL = codec.dumps({"id": "42", "caller": "79990009911"})


@pytest.fixture
async def broker_proxy(services: Services) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy.in_front_of(services.amqp_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


def proxied_url(services: Services, proxy: TcpProxy) -> str:
    return proxy.route(services.amqp_url, "?reconnect_interval=0.5")


@pytest.fixture
async def proxied_client(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> AsyncIterator[TestClient[Any, Any]]:
    settings = make_settings(
        services, namespace, amqp_url=proxied_url(services, broker_proxy), publish_timeout_s=1.0
    )
    app = init_app(settings)
    async with TestClient(TestServer(app)) as client:
        await asyncio.wait_for(app[BROKER].wait_ready(), timeout=10)
        yield client


async def wait_queued(amqp_url: str, queue_name: str, count: int) -> list[str]:
    """The ids of the messages taken from a queue once `count` different ones have come
    (a webhook both published and spooled may come twice). Polled on connections of their own
    (`take_queued`): the ingress may be declaring the queue at that moment."""
    taken: list[AbstractIncomingMessage] = []

    async def arrived() -> bool:
        await take_queued(amqp_url, queue_name, taken)
        return len({message.message_id for message in taken}) >= count

    await wait_for(arrived, seconds=30, what=f"{count} webhooks in {queue_name}")
    return [message.message_id or "" for message in taken]


def webhook(n: int) -> bytes:
    return codec.dumps({"id": str(n), "caller": "79990009911"})


def ingress_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `callpipe ingress` process for this test's settings."""
    return {
        **os.environ,
        "CALLPIPE_AMQP_URL": settings.amqp_url,
        "CALLPIPE_NAMESPACE": settings.namespace,
        "CALLPIPE_TOKENS": "acme:tok-acme",
        "CALLPIPE_HTTP_HOST": "127.0.0.1",
        "CALLPIPE_HTTP_PORT": str(settings.http_port),
        "CALLPIPE_SPOOL_DIR": str(settings.spool_path),
        **extra,
    }


async def start_ingress(
    env: dict[str, str], stderr: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        "ingress",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if stderr is None else stderr,
    )


async def wait_ready(
    session: aiohttp.ClientSession, base: str, *, publishing: bool = False
) -> None:
    """Until `/readyz` says ready (and, with `publishing`, not only ready to spool)."""

    async def ready() -> bool:
        try:
            async with session.get(f"{base}/readyz") as response:
                answer = await response.json()
                return response.status == 200 and not (publishing and answer.get("spooling"))
        except aiohttp.ClientConnectionError:
            return False

    await wait_for(ready, seconds=20, what="the ingress to be ready")


async def test_broker_gone_is_spooled_fast_then_drained(
    proxied_client: TestClient[Any, Any],
    broker_proxy: TcpProxy,
    services: Services,
    namespace: str,
) -> None:
    assert (await proxied_client.post("/roistat/tok-acme/call-start", data=CALL)).status == 200
    await broker_proxy.cut()

    started = time.monotonic()
    for n in range(10):
        response = await proxied_client.post("/roistat/tok-acme/call-start", data=webhook(n))
        assert response.status == 200
        assert (await response.json())["spooled"] is True
    assert time.monotonic() - started < 5  # well under a client's timeout, each
    ready = await proxied_client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["spooling"] is True
    metrics = await (await proxied_client.get("/metrics")).text()
    assert "callpipe_ingress_spool_messages 10.0" in metrics

    await broker_proxy.restore()
    ids = await wait_queued(services.amqp_url, Topology(namespace).call_queue("start"), 11)
    assert set(ids) == {"acme:42:start"} | {f"acme:{n}:start" for n in range(10)}

    async def spool_empty() -> bool:
        text = await (await proxied_client.get("/metrics")).text()
        return "callpipe_ingress_spool_messages 0.0" in text

    await wait_for(spool_empty, what="the spool metric back to 0")


async def test_a_disk_error_while_draining_is_retried_not_the_end_of_draining(
    proxied_client: TestClient[Any, Any],
    broker_proxy: TcpProxy,
    services: Services,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drainer records its progress on the spool's disk; when that fails, the webhooks
    stay spooled and it tries again, rather than leaving every later webhook spooled."""
    await broker_proxy.cut()
    for n in range(3):
        response = await proxied_client.post("/roistat/tok-acme/call-start", data=webhook(n))
        assert (await response.json())["spooled"] is True
    spool = proxied_client.app[SPOOL]
    blocker = spool.directory / "cursor.tmp"
    blocker.mkdir()  # the cursor cannot be written: as a failing disk would refuse it
    try:
        await broker_proxy.restore()

        async def failed_twice() -> bool:
            return caplog.text.count("spool drain failed") >= 2

        await wait_for(failed_twice, seconds=20, what="the drainer failing, then trying again")
        assert spool.messages == 3
    finally:
        blocker.rmdir()

    async def drained() -> bool:
        return not spool.messages

    await wait_for(drained, seconds=20, what="the spool drained once the disk works again")
    ids = await wait_queued(services.amqp_url, Topology(namespace).call_queue("start"), 3)
    assert set(ids) == {f"acme:{n}:start" for n in range(3)}  # sent again after each failure


async def test_a_spool_disk_that_stalls_is_503_and_not_ready_until_it_answers(
    proxied_client: TestClient[Any, Any],
    broker_proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker is away and the spool's disk hangs (a network volume): a webhook gets 503
    in WRITE_TIMEOUT_S rather than hanging, and /readyz sends the balancer elsewhere."""
    await broker_proxy.cut()
    with stalled_spool_disk(monkeypatch, timeout_s=0.3):
        started = time.monotonic()
        response = await proxied_client.post("/roistat/tok-acme/call-start", data=CALL)
        assert response.status == 503 and time.monotonic() - started < 5
        ready = await proxied_client.get("/readyz")
        assert ready.status == 503 and "not answering" in (await ready.json())["status"]

    async def ready_again() -> bool:
        return (await proxied_client.get("/readyz")).status == 200

    await wait_for(ready_again, what="/readyz once the disk answers")


async def test_a_confirm_that_never_comes_is_spooled_not_a_hang(
    broker_proxy: TcpProxy, services: Services, namespace: str
) -> None:
    # A publish timeout far longer than the confirm deadline (0.5 s), so that the answer's
    # time tells which of the two ended the wait.
    settings = make_settings(
        services, namespace, amqp_url=proxied_url(services, broker_proxy), publish_timeout_s=20
    )
    app = init_app(settings)
    async with TestClient(TestServer(app)) as client:
        await asyncio.wait_for(app[BROKER].wait_ready(), timeout=10)
        broker_proxy.freeze()
        started = time.monotonic()
        response = await asyncio.wait_for(
            client.post("/roistat/tok-acme/call-start", data=CALL), timeout=15
        )
        assert response.status == 200 and (await response.json())["spooled"] is True
        assert time.monotonic() - started < 5  # the confirm deadline, not the publish timeout
        broker_proxy.thaw()
        # The held publish may arrive as well as the spooled copy: both carry the same id.
        assert set(
            await wait_queued(services.amqp_url, Topology(namespace).call_queue("start"), 1)
        ) == {"acme:42:start"}


async def test_ingress_starts_without_a_broker_and_takes_webhooks(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    await broker_proxy.cut()
    settings = make_settings(services, namespace, amqp_url=proxied_url(services, broker_proxy))
    app = init_app(settings)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200  # the spool has room
        assert (await client.post("/roistat/tok-acme/call-start", data=CALL)).status == 200
        await broker_proxy.restore()
        await asyncio.wait_for(app[BROKER].wait_ready(), timeout=20)
        assert await wait_queued(services.amqp_url, Topology(namespace).call_queue("start"), 1) == [
            "acme:42:start"
        ]


async def test_a_full_spool_is_503_with_retry_after(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    await broker_proxy.cut()
    settings = make_settings(
        services,
        namespace,
        amqp_url=proxied_url(services, broker_proxy),
        spool_max_bytes=1024 * 1024,
        max_body_bytes=65536,
    )
    app = init_app(settings)
    big = codec.dumps({"id": "1", "pad": "x" * 60000})
    async with TestClient(TestServer(app)) as client:
        statuses = [
            (await client.post("/roistat/tok-acme/call-start", data=big)).status for _ in range(20)
        ]
        assert statuses[:15] == [200] * 15
        assert statuses[-1] == 503
        refused = await client.post("/roistat/tok-acme/call-start", data=big)
        assert refused.headers["Retry-After"] == "5"
        assert (await client.get("/readyz")).status == 503


async def test_a_spool_that_cannot_write_is_503(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    await broker_proxy.cut()
    settings = make_settings(services, namespace, amqp_url=proxied_url(services, broker_proxy))
    app = init_app(settings)
    async with TestClient(TestServer(app)) as client:
        shutil.rmtree(settings.spool_path)  # the volume went away under the running ingress
        response = await client.post("/roistat/tok-acme/call-start", data=CALL)
        assert response.status == 503
        assert "error" in await response.json()


async def test_sigterm_finishes_in_flight_webhooks_then_exits_0(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    settings = make_settings(services, namespace, amqp_url=proxied_url(services, broker_proxy))
    env = ingress_env(
        settings,
        CALLPIPE_PUBLISH_TIMEOUT_S="20",
        # Wait for the confirms rather than spool: the test holds them in flight on purpose.
        CALLPIPE_CONFIRM_DEADLINE_S="20",
        CALLPIPE_DRAIN_S="1",
    )
    process = await start_ingress(env, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base, publishing=True)
            # Hold the confirms back so that the requests are in flight when SIGTERM arrives.
            broker_proxy.freeze()
            in_flight = [
                asyncio.create_task(
                    session.post(f"{base}/roistat/tok-acme/call-start", data=codec.dumps({"id": n}))
                )
                for n in range(5)
            ]

            async def publishes_held() -> bool:
                return broker_proxy.held(b"x-callpipe-project") == 5

            await wait_for(publishes_held, what="5 publishes waiting for their confirm")
            process.send_signal(signal.SIGTERM)

            async def refuses_new_connections() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", settings.http_port)
                except OSError:
                    return True
                writer.close()
                return False

            await wait_for(refuses_new_connections, what="the ingress to stop accepting")
            broker_proxy.thaw()
            responses = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=20)
            assert [r.status for r in responses] == [200] * 5
        assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stderr is not None
        print((await process.stderr.read()).decode())


async def test_ingress_keeps_retrying_a_topology_that_fails_to_declare(
    services: Services, amqp: AbstractRobustConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue declared with other arguments (PRECONDITION_FAILED) must not leave it dead."""
    namespace = f"cpt_{uuid.uuid4().hex[:12]}"
    topology = Topology(namespace)
    async with amqp.channel() as channel:
        await channel.declare_queue(topology.call_queue("start"), durable=True)  # classic queue
    try:
        app = init_app(make_settings(services, namespace))
        async with TestClient(TestServer(app)) as client:

            async def failed_once() -> bool:
                return "broker link not set up" in caplog.text

            await wait_for(failed_once, what="a failed set-up of the broker link")
            response = await client.post("/roistat/tok-acme/call-start", data=CALL)
            assert response.status == 200 and (await response.json())["spooled"] is True
            async with amqp.channel() as channel:
                await channel.queue_delete(topology.call_queue("start"))
            await asyncio.wait_for(app[BROKER].wait_ready(), timeout=20)
            assert await wait_queued(services.amqp_url, topology.call_queue("start"), 1) == [
                "acme:42:start"
            ]
    finally:
        async with amqp.channel() as channel:
            await delete_topology(channel, topology)


async def test_a_killed_ingress_sends_its_spool_after_a_restart(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    settings = make_settings(services, namespace, amqp_url=proxied_url(services, broker_proxy))
    env = ingress_env(settings, CALLPIPE_DRAIN_S="0")
    base = f"http://127.0.0.1:{settings.http_port}"

    async def start() -> asyncio.subprocess.Process:
        process = await start_ingress(env)
        await wait_ready(session, base)
        return process

    await broker_proxy.cut()
    async with aiohttp.ClientSession() as session:
        process = await start()
        try:
            for n in range(20):
                async with session.post(
                    f"{base}/roistat/tok-acme/call-start", data=webhook(n)
                ) as response:
                    assert response.status == 200
                    assert (await response.json())["spooled"] is True
        finally:
            process.kill()  # SIGKILL: no cleanup, the spool is all there is
            await process.wait()
        await broker_proxy.restore()
        process = await start()
        try:
            ids = await wait_queued(services.amqp_url, Topology(namespace).call_queue("start"), 20)
        finally:
            process.terminate()
            await process.wait()
    assert set(ids) == {f"acme:{n}:start" for n in range(20)}


async def test_sigterm_drains_not_ready_but_still_serving(
    services: Services, namespace: str
) -> None:
    """A balancer needs time to notice: during the drain /readyz says no, webhooks still get
    their 200, and a connection opened before the signal is answered."""
    settings = make_settings(services, namespace)
    env = ingress_env(settings, CALLPIPE_DRAIN_S="3")
    process = await start_ingress(env)
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base)
            reader, writer = await asyncio.open_connection("127.0.0.1", settings.http_port)
            process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                async with session.get(f"{base}/readyz") as response:
                    return response.status == 503 and "draining" in await response.text()

            await wait_for(draining, what="/readyz to say it is draining")
            async with session.post(f"{base}/roistat/tok-acme/call-start", data=webhook(1)) as r:
                assert r.status == 200
            body = webhook(2)
            writer.write(
                b"POST /roistat/tok-acme/call-start HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answer = await asyncio.wait_for(reader.read(), timeout=10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    ids = await wait_queued(services.amqp_url, Topology(namespace).call_queue("start"), 2)
    assert set(ids) == {"acme:1:start", "acme:2:start"}
