"""The ingress when the broker goes away, hangs, or was never there; and its graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp.test_utils import TestClient, TestServer
from callpipe_testing import TcpProxy, wait_for
from conftest import Services, make_settings

from callpipe.broker import delete_topology
from ingress.app import BROKER, init_app
from schemas import codec
from schemas.topology import Topology

CALL = codec.dumps({"id": "42", "caller": "79990009911"})


@pytest.fixture
async def broker_proxy(services: Services) -> AsyncIterator[TcpProxy]:
    target = urlsplit(services.amqp_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


def proxied_url(services: Services, proxy: TcpProxy) -> str:
    target = urlsplit(services.amqp_url)
    netloc = f"{target.username}:{target.password}@127.0.0.1:{proxy.port}"
    return target._replace(netloc=netloc).geturl() + "?reconnect_interval=0.5"


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


async def test_broker_gone_is_503_with_retry_after_then_recovers(
    proxied_client: TestClient[Any, Any], broker_proxy: TcpProxy
) -> None:
    assert (await proxied_client.post("/roistat/tok-acme/call-start", data=CALL)).status == 200
    await broker_proxy.cut()

    response = await proxied_client.post("/roistat/tok-acme/call-start", data=CALL)
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert (await proxied_client.get("/readyz")).status == 503

    await broker_proxy.restore()

    async def accepted_again() -> bool:
        response = await proxied_client.post("/roistat/tok-acme/call-start", data=CALL)
        return response.status == 200

    await wait_for(accepted_again, seconds=20, what="the ingress to publish again")
    assert (await proxied_client.get("/readyz")).status == 200


async def test_confirm_that_never_comes_is_503_not_a_hang(
    proxied_client: TestClient[Any, Any], broker_proxy: TcpProxy
) -> None:
    broker_proxy.freeze()
    response = await asyncio.wait_for(
        proxied_client.post("/roistat/tok-acme/call-start", data=CALL), timeout=10
    )
    assert response.status == 503
    broker_proxy.thaw()


async def test_ingress_starts_without_a_broker_and_is_not_ready(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    await broker_proxy.cut()
    settings = make_settings(services, namespace, amqp_url=proxied_url(services, broker_proxy))
    app = init_app(settings)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
        assert (await client.post("/roistat/tok-acme/call-start", data=CALL)).status == 503
        await broker_proxy.restore()
        await asyncio.wait_for(app[BROKER].wait_ready(), timeout=20)
        assert (await client.post("/roistat/tok-acme/call-start", data=CALL)).status == 200


async def test_sigterm_finishes_in_flight_webhooks_then_exits_0(
    services: Services, namespace: str, broker_proxy: TcpProxy
) -> None:
    settings = make_settings(services, namespace, amqp_url=proxied_url(services, broker_proxy))
    env = {
        **os.environ,
        "CALLPIPE_AMQP_URL": settings.amqp_url,
        "CALLPIPE_NAMESPACE": namespace,
        "CALLPIPE_TOKENS": "acme:tok-acme",
        "CALLPIPE_HTTP_HOST": "127.0.0.1",
        "CALLPIPE_HTTP_PORT": str(settings.http_port),
        "CALLPIPE_PUBLISH_TIMEOUT_S": "20",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        "ingress",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"{base}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(ready, seconds=20, what="the ingress to be ready")
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
            assert (await client.get("/readyz")).status == 503
            assert (await client.post("/roistat/tok-acme/call-start", data=CALL)).status == 503
            async with amqp.channel() as channel:
                await channel.queue_delete(topology.call_queue("start"))
            await asyncio.wait_for(app[BROKER].wait_ready(), timeout=20)
            assert (await client.post("/roistat/tok-acme/call-start", data=CALL)).status == 200
    finally:
        async with amqp.channel() as channel:
            await delete_topology(channel, topology)
