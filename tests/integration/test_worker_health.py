"""Worker /healthz, /readyz, /metrics on the real broker and database."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from callpipe_testing import TcpProxy, wait_for
from conftest import Services, free_port, make_settings

from infra.settings import Settings
from schemas import codec
from workers.health import WorkerMonitor, serve_worker_endpoints
from workers.service import run_worker


def webhook(call_id: str, *, project: str | None = "acme") -> aio_pika.Message:
    headers: dict[str, Any] = {
        "x-callpipe-kind": "end",
        "x-callpipe-received-at": datetime.now(UTC).isoformat(),
    }
    if project is not None:
        headers["x-callpipe-project"] = project
    body = codec.dumps({"id": call_id, "caller": "79990009911", "status": "ANSWER"})
    return aio_pika.Message(
        body,
        headers=headers,
        message_id=f"{project}:{call_id}:end",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish(
    amqp: AbstractRobustConnection, settings: Settings, *messages: aio_pika.Message
) -> None:
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(settings.topology.webhooks_exchange)
        for message in messages:
            await exchange.publish(message, "roistat.call.end")


@dataclass
class RunningWorker:
    monitor: WorkerMonitor
    base: str
    http: aiohttp.ClientSession

    def value(self, name: str) -> float:
        found = self.monitor.metrics.registry.get_sample_value(name, {"kind": "end"})
        return found or 0.0

    async def counted(self, name: str, at_least: float = 1) -> bool:
        return self.value(name) >= at_least

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path) as response:
            if path == "/metrics":
                return response.status, await response.text()
            return response.status, await response.json()


class Runner:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, settings: Settings, http: aiohttp.ClientSession) -> RunningWorker:
        monitor = WorkerMonitor()
        self.tasks.append(asyncio.create_task(serve_worker_endpoints(settings, monitor, self.stop)))
        self.tasks.append(asyncio.create_task(run_worker(settings, "end", self.stop, monitor)))
        worker = RunningWorker(monitor, f"http://127.0.0.1:{settings.metrics_port}", http)

        async def ready() -> bool:
            try:
                return (await worker.get("/readyz"))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_for(ready, what="the worker ready")
        return worker


@pytest.fixture
async def running() -> AsyncIterator[Runner]:
    runner = Runner()
    try:
        yield runner
    finally:
        runner.stop.set()
        await asyncio.wait_for(asyncio.gather(*runner.tasks), timeout=30)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def proxies(services: Services) -> AsyncIterator[dict[str, TcpProxy]]:
    made = {}
    for name, url in (("amqp", services.amqp_url), ("db", services.database_url)):
        made[name] = TcpProxy.in_front_of(url)
        await made[name].start()
    try:
        yield made
    finally:
        for proxy in made.values():
            await proxy.cut()


@pytest.fixture
def proxied(services: Services, namespace: str, proxies: dict[str, TcpProxy]) -> Settings:
    """Broker and database reached through this test's own proxies."""
    return make_settings(
        services,
        namespace,
        metrics_port=free_port(),
        amqp_url=proxies["amqp"].route(services.amqp_url, "?reconnect_interval=0.5"),
        database_url=proxies["db"].route(services.database_url),
        publish_timeout_s=2.0,
    )


async def test_stored_duplicate_and_poison_are_counted_once_each(
    services: Services,
    namespace: str,
    amqp: AbstractRobustConnection,
    running: Runner,
    http: aiohttp.ClientSession,
) -> None:
    settings = make_settings(services, namespace, metrics_port=free_port())
    worker = await running.start(settings, http)
    await publish(amqp, settings, webhook("first"))
    await wait_for(lambda: worker.counted("callpipe_worker_processed_total"), what="stored")
    await publish(amqp, settings, webhook("first"))
    await wait_for(lambda: worker.counted("callpipe_worker_duplicates_total"), what="duplicate")
    await publish(amqp, settings, webhook("no-project", project=None))
    await wait_for(lambda: worker.counted("callpipe_worker_dead_lettered_total"), what="dead")

    status, text = await worker.get("/metrics")
    assert status == 200
    assert 'callpipe_worker_processed_total{kind="end"} 1.0' in text
    assert 'callpipe_worker_duplicates_total{kind="end"} 1.0' in text
    assert 'callpipe_worker_dead_lettered_total{kind="end"} 1.0' in text
    assert 'callpipe_worker_retries_total{kind="end"} 0.0' in text
    assert 'callpipe_worker_processing_seconds_count{kind="end"} 3.0' in text
    assert 'callpipe_worker_oldest_unacked_age_seconds{kind="end"} 0.0' in text
    assert 'callpipe_worker_processed_total{kind="start"} 0.0' in text

    async def event_published() -> bool:
        _, text = await worker.get("/metrics")
        return 'callpipe_worker_events_published_total{kind="end"} 1.0' in text

    await wait_for(event_published, what="the relay's count of published events")
    _, text = await worker.get("/metrics")
    assert 'callpipe_worker_outbox_pending{kind="end"} 0.0' in text
    assert await worker.get("/healthz") == (200, {"status": "ok"})


async def test_database_down_counts_retries_and_readyz_says_why(
    proxied: Settings,
    amqp: AbstractRobustConnection,
    running: Runner,
    http: aiohttp.ClientSession,
    proxies: dict[str, TcpProxy],
) -> None:
    worker = await running.start(proxied, http)
    await proxies["db"].cut()
    await publish(amqp, proxied, webhook("during-outage"))
    await wait_for(lambda: worker.counted("callpipe_worker_retries_total", 2), what="retries")

    async def not_ready() -> Any:
        status, body = await worker.get("/readyz")
        return body if status == 503 else None

    body = await wait_for(not_ready, what="readyz 503")
    assert body["workers"] == {"end": "database unreachable"}
    assert worker.value("callpipe_worker_processed_total") == 0

    await proxies["db"].restore()
    await wait_for(lambda: worker.counted("callpipe_worker_processed_total"), seconds=40)
    assert (await worker.get("/readyz"))[0] == 200


async def test_readyz_is_503_while_the_broker_link_is_down(
    proxied: Settings,
    running: Runner,
    http: aiohttp.ClientSession,
    proxies: dict[str, TcpProxy],
) -> None:
    worker = await running.start(proxied, http)
    await proxies["amqp"].cut()

    async def not_ready() -> Any:
        status, body = await worker.get("/readyz")
        return body if status == 503 else None

    body = await wait_for(not_ready, what="readyz 503")
    assert "consume channel closed" in body["workers"]["end"]
    await proxies["amqp"].restore()

    async def ready() -> bool:
        return (await worker.get("/readyz"))[0] == 200

    await wait_for(ready, seconds=30, what="ready again after the broker link is back")


async def test_oldest_unacked_age_grows_while_a_delivery_is_held(
    proxied: Settings,
    amqp: AbstractRobustConnection,
    running: Runner,
    http: aiohttp.ClientSession,
    proxies: dict[str, TcpProxy],
) -> None:
    worker = await running.start(proxied, http)
    proxies["db"].freeze()  # the delivery is taken, its transaction hangs
    await publish(amqp, proxied, webhook("held"))
    gauge = "callpipe_worker_oldest_unacked_age_seconds"

    async def held_for_a_while() -> bool:
        _, text = await worker.get("/metrics")
        line = next(line for line in text.splitlines() if line.startswith(gauge + '{kind="end"}'))
        return float(line.split()[-1]) >= 0.5

    await wait_for(held_for_a_while, what="a non-zero oldest-unacked age")
    proxies["db"].thaw()
    await wait_for(lambda: worker.counted("callpipe_worker_processed_total"), seconds=40)
    assert worker.value(gauge) == 0


async def test_callpipe_worker_end_serves_healthz_on_the_metrics_port(settings: Settings) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLPIPE_")},
        "CALLPIPE_AMQP_URL": settings.amqp_url,
        "CALLPIPE_DATABASE_URL": settings.database_url,
        "CALLPIPE_NAMESPACE": settings.namespace,
        "CALLPIPE_HTTP_HOST": "127.0.0.1",
        "CALLPIPE_METRICS_PORT": str(port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callpipe", "worker", "end", env=env
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def answers(path: str) -> Any:
                try:
                    async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                        return response.status == 200 and await response.json()
                except aiohttp.ClientConnectionError:
                    return None

            assert await wait_for(lambda: answers("/healthz"), seconds=30) == {"status": "ok"}
            ready = await wait_for(lambda: answers("/readyz"), seconds=30, what="readyz")
            assert ready == {"status": "ready", "workers": {"end": "consuming"}}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_metrics_port_in_use_is_logged_and_the_worker_still_consumes(
    settings: Settings,
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CALLPIPE_")},
            "CALLPIPE_AMQP_URL": settings.amqp_url,
            "CALLPIPE_DATABASE_URL": settings.database_url,
            "CALLPIPE_NAMESPACE": settings.namespace,
            "CALLPIPE_HTTP_HOST": "127.0.0.1",
            "CALLPIPE_METRICS_PORT": str(held.getsockname()[1]),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "callpipe",
            "worker",
            "end",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            seen: list[str] = []
            while not any("consuming" in line for line in seen):
                line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
                assert line, f"the worker exited: {seen}"
                seen.append(line.decode())
            assert any("CALLPIPE_METRICS_PORT" in line and "in use" in line for line in seen)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
