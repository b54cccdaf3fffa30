"""A lean HTTP/1.1 load client for the benchmarks: keep-alive connections on asyncio
protocols, requests encoded before the clock runs, answers read by Content-Length.

On 2 cores the load generator takes its CPU from the servers it measures. aiohttp's client
spends ~300 µs of CPU per request here; this one a small fraction of that, so the figures
are the pipeline's, not the generator's (the same reason the ingress bench uses wrk). It
speaks only what the callpipe ingress answers: one request at a time per connection, and
answers with a Content-Length (no chunked encoding).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast


class HttpAnswerError(ConnectionError):
    """The connection closed, or the answer was not one this client reads."""


def post_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    """The whole request, encoded once."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        try:
            status, length = _read_head(bytes(self._buffer[:end]))
        except (ValueError, IndexError) as exc:
            self._fail(HttpAnswerError(f"unreadable answer: {exc}"))
            return
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        body = bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpAnswerError(f"connection closed: {exc}"))

    def _fail(self, exc: Exception) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


def _read_head(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, int(value)
    raise ValueError("no Content-Length")


class LeanHttpClient:
    """At most `limit` keep-alive connections to one server; a request waits for a free one."""

    def __init__(self, host: str, port: int, limit: int, timeout_s: float = 30.0) -> None:
        self._host, self._port, self._limit, self._timeout_s = host, port, limit, timeout_s
        self._idle: list[_Connection] = []
        self._opened = 0
        self._waiting: deque[asyncio.Future[_Connection | None]] = deque()

    async def request(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request, encoded with `post_request`."""
        connection = await self._take()
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await connection.send(request)
        except BaseException:
            connection.close()
            self._give_back(None)
            raise
        self._give_back(connection)
        return answer

    async def _take(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._opened -= 1
        if self._opened >= self._limit:
            turn: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            given = await turn
            if given is not None:
                return given
        self._opened += 1
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                _Connection, self._host, self._port
            )
        except BaseException:
            self._opened -= 1
            raise
        return connection

    def _give_back(self, connection: _Connection | None) -> None:
        """A connection after its answer, or None for one that was closed (a waiter may then
        open a new one)."""
        if connection is None or connection.closed:
            self._opened -= 1
            connection = None
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(connection)  # None: the waiter opens one of its own
                return
        if connection is not None:
            self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
