"""Test helpers: waiting on conditions, taking what a queue holds, a TCP proxy that plays a
failing network, a spool disk that stalls, and a trigger that makes PostgreSQL refuse one
call."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

import ingress.spool as spool_module
from ingress.spool import Spool

T = TypeVar("T")


async def wait_for(
    condition: Callable[[], Awaitable[T | None]], *, seconds: float = 15.0, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    last: T | None = None
    while time.monotonic() < deadline:
        last = await condition()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {seconds}s waiting for {what} (last value: {last!r})")


async def take_queued(amqp_url: str, queue_name: str, taken: list[AbstractIncomingMessage]) -> None:
    """Take every message now in a queue (acked) into `taken`, on a connection of its own;
    nothing while the queue is not ready.

    For a queue that was deleted and is declared again: until then a get finds no queue, and
    just after, a quorum queue whose process has not started yet makes the broker close the
    whole connection ("noproc"), which must not break the tests' shared one. What was taken
    before such a failure stays in `taken`: it was acked, so no later call sees it again.
    """
    with contextlib.suppress(aio_pika.exceptions.AMQPError):
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection, connection.channel() as channel:
            queue = await channel.get_queue(queue_name)
            while (message := await queue.get(fail=False)) is not None:
                await message.ack()
                taken.append(message)


@contextlib.contextmanager
def stalled_spool_disk(
    monkeypatch: pytest.MonkeyPatch, timeout_s: float
) -> Iterator[threading.Event]:
    """Every spool write waits until the event yielded is set (at the latest when the block
    ends, failing or not), as on a hung network volume; an append gives up after `timeout_s`."""
    monkeypatch.setattr(spool_module, "WRITE_TIMEOUT_S", timeout_s)
    disk_answers = threading.Event()
    write = Spool._write

    def stalled(self: Spool, data: bytes, sync_directory: bool) -> None:
        disk_answers.wait(timeout=30)
        write(self, data, sync_directory)

    monkeypatch.setattr(Spool, "_write", stalled)
    try:
        yield disk_answers
    finally:
        disk_answers.set()


async def refuse_call(
    db: asyncpg.Pool, namespace: str, call_id: str, *, message: str, errcode: str = "P0001"
) -> None:
    """Make PostgreSQL itself refuse the `calls` row of `call_id` with `message` and SQLSTATE
    `errcode` (P0001: an error nobody classified; 22xxx: data it cannot store). Dropped
    with the namespace's schema."""
    await db.execute(
        f"""
        CREATE FUNCTION "{namespace}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.call_id = '{call_id}' THEN
                RAISE EXCEPTION '{message}' USING ERRCODE = '{errcode}';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON "{namespace}".calls
            FOR EACH ROW EXECUTE FUNCTION "{namespace}".refuse();
        """
    )


DEFAULT_PORTS = {"amqp": 5672, "postgresql": 5432, "postgres": 5432}


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a service; a test can cut, freeze or restore the link.

    The real broker and database stay untouched: only this test's path to them fails.
    """

    @classmethod
    def in_front_of(cls, url: str) -> TcpProxy:
        """A proxy to the service at `url` (its host, and its port or the scheme's)."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[parts.scheme])

    def route(self, url: str, query: str = "") -> str:
        """`url` (its user, password and path) through this proxy, with `query` appended."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl() + query

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._held: list[bytes] = []
        self._freeze_at: bytes | None = None
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """The service is gone: refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for link in list(self._links):
            link.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def restore(self) -> None:
        self._flowing.set()
        if self._server is None:
            await self.start()

    def freeze(self) -> None:
        """Connections stay open but nothing gets through (a hung peer)."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def freeze_at(self, marker: bytes) -> None:
        """Freeze as soon as `marker` is read, before the data holding it is passed on."""
        self._freeze_at = marker

    def held(self, marker: bytes) -> int:
        """How many times `marker` occurs in the data read but not yet passed on."""
        return b"".join(self._held).count(marker)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self.accepted += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
            await asyncio.gather(
                self._pump(reader, upstream_writer), self._pump(upstream_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled by cut(): the link is simply gone
        finally:
            self._links.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read eagerly, write only while flowing: frozen data piles up where `held` sees it."""
        pending: asyncio.Queue[bytes] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(65536):
                    if self._freeze_at is not None and self._freeze_at in data:
                        self._freeze_at = None
                        self.freeze()
                    self._held.append(data)
                    await pending.put(data)
            except OSError:
                pass  # a killed peer resets the connection: pass that on as an end
            finally:
                await pending.put(b"")

        reading = asyncio.create_task(read())
        try:
            while data := await pending.get():
                await self._flowing.wait()
                self._held.remove(data)
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()
        finally:
            reading.cancel()
