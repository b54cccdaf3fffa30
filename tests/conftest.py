"""Fixtures: real RabbitMQ and PostgreSQL, a fresh namespace per test, running components.

Services: testcontainers when a Docker engine answers; otherwise CALLPIPE_TEST_AMQP_URL /
CALLPIPE_TEST_DATABASE_URL, or the standard local ports. A service that cannot be reached
fails the run: integration tests never skip silently.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestClient, TestServer
from callpipe_testing import wait_for

from infra.broker import declare_topology, delete_topology
from infra.settings import Settings
from ingress.app import BROKER, init_app
from schemas import codec
from schemas.topology import Kind, Topology
from workers.migrate import drop_schema, migrate
from workers.service import run_worker

TOKENS = "acme:tok-acme,beta:tok-beta"
# Every test's ingress spools into a directory of its own under here, removed at exit.
SPOOL_ROOT = Path(tempfile.mkdtemp(prefix="callpipe-test-spool-"))
atexit.register(shutil.rmtree, SPOOL_ROOT, True)


def compose_image(name: str) -> str:
    """The exact image docker-compose.yml runs for `name`: the tests use the same one."""
    compose = (Path(__file__).parent.parent / "docker-compose.yml").read_text()
    found = re.findall(rf"^ +image: +({re.escape(name)}:[^\s#]+)", compose, re.MULTILINE)
    if len(found) != 1:
        raise LookupError(f"docker-compose.yml: expected one {name} image, found {found}")
    image: str = found[0]
    return image


@dataclass(frozen=True)
class Services:
    amqp_url: str
    database_url: str


def _docker_answers() -> bool:
    if os.environ.get("CALLPIPE_TEST_NO_DOCKER") or shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    if _docker_answers() and "CALLPIPE_TEST_AMQP_URL" not in os.environ:
        from testcontainers.postgres import PostgresContainer
        from testcontainers.rabbitmq import RabbitMqContainer

        with (
            RabbitMqContainer(compose_image("rabbitmq")) as rabbit,
            PostgresContainer(compose_image("postgres")) as pg,
        ):
            amqp = f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
            db = pg.get_connection_url(driver=None).replace("postgresql+psycopg2", "postgresql")
            yield Services(amqp, db)
        return
    yield Services(
        os.environ.get("CALLPIPE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        os.environ.get(
            "CALLPIPE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )


@pytest.fixture(scope="session")
async def amqp(services: Services) -> AsyncIterator[AbstractRobustConnection]:
    try:
        connection = await aio_pika.connect_robust(services.amqp_url, timeout=10)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {services.amqp_url}: {exc}", pytrace=False)
    async with connection:
        yield connection


@pytest.fixture(scope="session")
async def db(services: Services) -> AsyncIterator[asyncpg.Pool]:
    try:
        pool = await asyncpg.create_pool(services.database_url, min_size=1, max_size=4, timeout=10)
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {services.database_url}: {exc}", pytrace=False)
    async with pool:
        yield pool


@pytest.fixture
async def namespace(amqp: AbstractRobustConnection, db: asyncpg.Pool) -> AsyncIterator[str]:
    """A namespace of this test's own: topology declared, schema migrated, both removed after."""
    name = f"cpt_{uuid.uuid4().hex[:12]}"
    topology = Topology(name)
    async with amqp.channel() as channel:
        await declare_topology(channel, topology)
    async with db.acquire() as conn:
        await migrate(conn, name)
    try:
        yield name
    finally:
        async with amqp.channel() as channel:
            await delete_topology(channel, topology)
        async with db.acquire() as conn:
            await drop_schema(conn, name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_settings(services: Services, namespace: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": services.amqp_url,
        "database_url": services.database_url,
        "namespace": namespace,
        "tokens": TOKENS,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "publish_timeout_s": 10.0,  # slow fsyncs on a busy CI box must not fail a test
        "shutdown_timeout_s": 10.0,
        "prefetch": 16,
        "spool_dir": SPOOL_ROOT / f"{namespace}-{uuid.uuid4().hex[:6]}",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(services: Services, namespace: str) -> Settings:
    return make_settings(services, namespace)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The ingress app on a local port, its broker link connected."""
    app = init_app(settings)
    async with TestClient(TestServer(app)) as test_client:
        await asyncio.wait_for(app[BROKER].wait_ready(), timeout=10)
        yield test_client


class Workers:
    """Both workers running in this test's event loop, stopped (gracefully) at teardown."""

    def __init__(self) -> None:
        self._stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(self, settings: Settings, kind: Kind) -> asyncio.Event:
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(settings, kind, stop), name=f"worker-{kind}")
        self._stops.append((stop, task))
        return stop

    def start_both(self, settings: Settings) -> None:
        self.start(settings, "start")
        self.start(settings, "end")

    async def stop_all(self) -> None:
        for stop, _ in self._stops:
            stop.set()
        for _, task in self._stops:
            await asyncio.wait_for(task, timeout=20)
        self._stops.clear()


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    running = Workers()
    try:
        yield running
    finally:
        await running.stop_all()


class Collector:
    """Messages arriving on a queue of the test's own, decoded."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.messages.append(message)

    def bodies(self) -> list[Any]:
        return [codec.loads(message.body) for message in self.messages]

    async def settle(self, amqp: AbstractRobustConnection, exchange: str, routing_key: str) -> None:
        """Publish a marker behind everything already sent and wait for it: whatever was
        published before has arrived by then. The marker is not kept."""
        async with amqp.channel() as channel:
            target = await channel.get_exchange(exchange)
            await target.publish(aio_pika.Message(b"{}", message_id="marker"), routing_key)

        async def marker_seen() -> bool:
            return any(message.message_id == "marker" for message in self.messages)

        await wait_for(marker_seen, what="the marker behind earlier messages")
        self.messages = [message for message in self.messages if message.message_id != "marker"]


@pytest.fixture
async def subscribe(
    amqp: AbstractRobustConnection,
) -> AsyncIterator[Callable[[str, str], Any]]:
    """`await subscribe(exchange, binding_key)` → a Collector fed by an exclusive queue."""
    channel = await amqp.channel()
    try:

        async def bind(exchange: str, binding_key: str) -> Collector:
            collector = Collector()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=binding_key)
            await queue.consume(collector.on_message)
            return collector

        yield bind
    finally:
        await channel.close()
