"""Shared pieces of the callpipe benchmarks: namespaces, subprocesses, payloads, statistics.

Imported by the scripts next to it (run them as `python bench/<script>.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import aio_pika
import aiohttp
import asyncpg
from aio_pika.abc import AbstractConnection

from callpipe.sample import call_end, sample_call
from infra.broker import declare_topology, delete_topology
from infra.runner import run
from schemas import codec
from schemas.topology import Topology
from workers.migrate import drop_schema

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
DEFAULT_AMQP_URL = f"amqp://guest:guest@{LOCALHOST}:5672/"
DEFAULT_DATABASE_URL = f"postgresql://postgres@{LOCALHOST}:5432/postgres"
BENCH_PROJECT = "bench"
BENCH_TOKEN = "bench-token"


def require_local(url: str, what: str) -> str:
    """Benchmarks only ever talk to this machine, by its IPv4 loopback address."""
    host = urlsplit(url).hostname
    if host != LOCALHOST:
        raise SystemExit(f"{what} must point at {LOCALHOST}, not {host!r}: {url}")
    return url


def new_namespace() -> str:
    return f"bench_{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def machine_line() -> str:
    try:
        loop = f"uvloop {metadata.version('uvloop')}"
    except metadata.PackageNotFoundError:
        loop = "asyncio loop"
    return (
        f"python {platform.python_version()}, {loop}, aiohttp {aiohttp.__version__}, "
        f"aio-pika {aio_pika.__version__}, {os.cpu_count()} CPUs"
    )


async def broker_version(connection: AbstractConnection) -> str:
    transport = connection.transport
    if transport is None:
        return "?"
    properties: Mapping[str, Any] = transport.connection.server_properties
    version = properties.get("version", "?")
    return version.decode() if isinstance(version, bytes) else str(version)


# --- payloads ------------------------------------------------------------------------------


class Payloads:
    """Roistat-shaped call bodies of about 1 KB, built on callpipe's own sample generator."""

    def __init__(self, seed: int, tz: str = "Europe/Moscow") -> None:
        self._rng = random.Random(seed)
        # Calls in time order, one second apart from a day ago: later calls from the same
        # 200 numbers find earlier ones, so the repeat-caller lookup has work to do.
        self._first_call = datetime.now(ZoneInfo(tz)).replace(tzinfo=None) - timedelta(days=1)
        self._callers = [f"7999{self._rng.randint(1000000, 9999999)}" for _ in range(200)]
        self._base = self._rng.randint(10**11, 10**12 - 10**7)

    def call_id(self, index: int) -> str:
        return str(self._base + index)

    def start(self, index: int) -> dict[str, Any]:
        called_at = self._first_call + timedelta(seconds=index)
        call = sample_call(self._rng, index, called_at, self._callers)
        call["id"] = self.call_id(index)
        # Fields Roistat sends that the sample leaves out; they bring the body to ~1 KB.
        query = "&".join(
            f"{key}={call[key] or ''}" for key in ("utm_source", "utm_medium", "utm_campaign")
        )
        call["landing_page"] = f"https://shop.example/catalog/phones?{query}&roistat=ya_123"
        call["first_visit"] = self._first_call.strftime("%Y-%m-%d %H:%M:%S")
        if call["referrer"]:
            call["referrer"] += "search/?text=купить+телефон+в+москве&lr=213&clid=2270455"
        for n in range(1, 6):
            call[f"roistat_param_{n}"] = f"direct_campaign_{n}_{self._rng.randint(10**6, 10**7)}"
        return call

    def end(self, start: dict[str, Any]) -> dict[str, Any]:
        return call_end(self._rng, start)


def encode(document: dict[str, Any]) -> bytes:
    return codec.dumps(document)


# --- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> Spread | None:
        """Percentiles in milliseconds (linear interpolation between ranks)."""
        if not samples_s:
            return None
        ms = sorted(value * 1000.0 for value in samples_s)
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], ms[0])
        cuts = statistics.quantiles(ms, n=100, method="inclusive")
        return cls(cuts[49], cuts[94], cuts[98], ms[-1])


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The first column left-aligned, the others right-aligned."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


# --- subprocesses --------------------------------------------------------------------------


def callpipe_env(namespace: str, amqp_url: str, database_url: str, **extra: str) -> dict[str, str]:
    """This process's environment without any CALLPIPE_* of its own, plus the bench's."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CALLPIPE_")}
    env.update(
        CALLPIPE_NAMESPACE=namespace,
        CALLPIPE_AMQP_URL=amqp_url,
        CALLPIPE_DATABASE_URL=database_url,
        CALLPIPE_TOKENS=f"{BENCH_PROJECT}:{BENCH_TOKEN}",
        CALLPIPE_HTTP_HOST=LOCALHOST,
    )
    env.update({f"CALLPIPE_{key.upper()}": value for key, value in extra.items()})
    return env


class Subprocesses:
    """Child processes started by a benchmark, each logging to a file of its own.

    `stop_all` sends SIGTERM to each, waits until a deadline, then SIGKILLs the rest.
    It is idempotent, so it can sit both in the async `finally` and in `main`'s.
    """

    def __init__(self, stop_deadline_s: float = 15.0) -> None:
        self._deadline_s = stop_deadline_s
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, TextIO] = {}
        self.log_dir = Path(tempfile.mkdtemp(prefix="callpipe-bench-"))
        self.failed = False

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        self._logs[name] = log
        # Own session: a Ctrl-C in the terminal reaches only us; we stop the children in order.
        self._procs[name] = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def run_to_end(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], timeout_s: float
    ) -> str:
        """Run a short-lived child (`callpipe setup`) to its end; its output. Raises on failure."""
        self.start(name, argv, env)
        proc = self._procs[name]
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                self.failed = True
                self.stop(name)
                raise RuntimeError(f"{name} did not finish in {timeout_s:g}s:\n{self.tail(name)}")
            await asyncio.sleep(0.05)
        self.stop(name)
        if proc.returncode != 0:
            self.failed = True
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
        return self.tail(name)

    def check_alive(self) -> None:
        for name, proc in self._procs.items():
            code = proc.poll()
            if code is not None:
                self.failed = True
                raise RuntimeError(f"{name} exited early with {code}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str) -> int | None:
        """Stop one child (SIGTERM, then SIGKILL after the deadline); its exit code."""
        proc = self._procs.pop(name, None)
        if proc is None:
            return None
        self._signal(proc, signal.SIGTERM)
        try:
            code = proc.wait(timeout=self._deadline_s)
        except subprocess.TimeoutExpired:
            print(f"  {name} did not stop in {self._deadline_s:g}s: killing it", file=sys.stderr)
            self._signal(proc, signal.SIGKILL)
            code = proc.wait()
        self._logs.pop(name).close()
        return code

    def stop_all(self) -> None:
        """SIGTERM to every child at once, one shared deadline, then SIGKILL."""
        for proc in self._procs.values():
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self._deadline_s
        for name, proc in self._procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {name} did not stop in time: killing it", file=sys.stderr)
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def remove_logs(self) -> None:
        """Logs are kept (and their folder printed) when something went wrong."""
        if self.failed:
            print(f"subprocess logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the running benchmark like Ctrl-C does, so its `finally` cleans up."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def wait_http_ok(
    url: str, procs: Subprocesses, timeout_s: float = 30.0, what: str = "server"
) -> None:
    """Poll `url` until it answers 200; fail early if a child died."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            procs.check_alive()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                procs.failed = True
                raise RuntimeError(f"{what} not ready at {url} after {timeout_s:g}s")
            await asyncio.sleep(0.1)


# --- broker and database -------------------------------------------------------------------


async def queue_depth(connection: AbstractConnection, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of an existing queue, by a passive declare."""
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return result.message_count or 0, result.consumer_count or 0


async def declare_namespace(amqp_url: str, namespace: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection, connection.channel() as channel:
        await declare_topology(channel, Topology(namespace))


async def remove_namespace(
    amqp_url: str,
    namespace: str,
    *,
    database_url: str | None = None,
    extra_queues: Sequence[str] = (),
) -> None:
    """Delete the namespace's exchanges and queues (and schema): only objects named after it."""
    topology = Topology(namespace)
    for queue in extra_queues:
        if not queue.startswith(f"{namespace}."):
            raise ValueError(f"{queue!r} is not in namespace {namespace!r}")
    problems: list[str] = []
    try:
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection, connection.channel() as channel:
            for queue in extra_queues:
                await channel.queue_delete(queue)
            await delete_topology(channel, topology)
    except Exception as exc:
        problems.append(f"broker: {type(exc).__name__}: {exc}")
    if database_url is not None:
        try:
            conn = await asyncpg.connect(database_url, timeout=10)
            try:
                await drop_schema(conn, namespace)
            finally:
                await conn.close()
        except Exception as exc:
            problems.append(f"database: {type(exc).__name__}: {exc}")
    if problems:
        print(f"cleanup of namespace {namespace} incomplete: {'; '.join(problems)}")
    else:
        what = "queues, exchanges and schema" if database_url else "queues and exchanges"
        print(f"namespace {namespace}: {what} removed")


Bench = Callable[[argparse.Namespace, "Subprocesses"], Coroutine[Any, Any, int]]


def run_bench(bench: Bench, args: argparse.Namespace) -> int:
    """Run a benchmark; its child processes are stopped whatever happens (Ctrl-C included)."""
    procs = Subprocesses()
    try:
        return run(bench(args, procs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        procs.failed = True
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        procs.failed = True
        raise
    finally:
        procs.stop_all()
        procs.remove_logs()
