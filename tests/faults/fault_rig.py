"""The rig of one fault scenario: real `callpipe` processes, a paced load with a ledger,
and, after recovery and drain, what storage and the event stream hold.

Each scenario gets a namespace, spool directories, ports and logs of its own. The ingress
and the workers run as the operator runs them (`callpipe ingress`, `callpipe worker start`,
`callpipe worker end`), workers restarted when they die as a supervisor would. Events are
counted from a durable queue of the rig's own bound to `{ns}.events` with `#`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
from callpipe_testing import wait_for
from fault_checker import NO_ANSWER, OK, REFUSED, SPOOLED, Answer, Stored
from service_control import rabbitmqctl

from callpipe.broker import declare_topology, delete_topology
from schemas import codec
from schemas.topology import KINDS, Kind, Topology
from workers.migrate import drop_schema, migrate

PROJECT, TOKEN = "acme", "tok-acme"
MARKER = "faultcheck:marker"
STOP_TIMEOUT_S = 20.0

# Every process a rig started and nobody has reaped yet (a timeout can cut a scenario short).
LIVE_PIDS: set[int] = set()


def kill_leftovers() -> None:
    """SIGKILL whatever a rig started and did not stop (paused ones included)."""
    for pid in list(LIVE_PIDS):
        for signum in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        LIVE_PIDS.discard(pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CallpipeProcess:
    """One `callpipe ...` process; its stderr appended to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "callpipe",
                *self.args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        LIVE_PIDS.add(self.process.pid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        LIVE_PIDS.discard(self.process.pid)
        return code

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code."""
        if self.process is None:
            return None
        self.send(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            self.send(signal.SIGKILL)
            return await self.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SupervisedWorker:
    """`callpipe worker KIND`, restarted whenever it dies (as `restart: always` does); armed
    with a failpoint for its first `kills` lives."""

    def __init__(
        self, kind: Kind, env: dict[str, str], log_dir: Path, failpoint: str | None, kills: int
    ) -> None:
        self.kind = kind
        self._env = env
        self._log_path = log_dir / f"worker-{kind}.log"
        self._failpoint = failpoint
        self._kills = kills
        self.exits: list[int] = []
        self.current = self._make()
        self._stopping = False
        self._watching: asyncio.Task[None] | None = None

    def _make(self) -> CallpipeProcess:
        env = dict(self._env)
        if self._failpoint is not None and len(self.exits) < self._kills:
            env["CALLPIPE_FAILPOINT"] = self._failpoint
        return CallpipeProcess(["worker", self.kind], env, self._log_path)

    async def start(self) -> None:
        await self.current.start()
        self._watching = asyncio.create_task(self._watch(), name=f"supervise-{self.kind}")

    async def _watch(self) -> None:
        while True:
            self.exits.append(await self.current.wait())
            if self._stopping:
                return
            self.current = self._make()
            await self.current.start()
            if self._stopping:
                await self.current.stop()
                return

    def kill(self) -> None:
        self.current.send(signal.SIGKILL)

    async def stop(self) -> None:
        self._stopping = True
        await self.current.stop()
        if self._watching is not None:
            await self._watching

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""


class Ingress:
    """`callpipe ingress` on a port and spool directory of its own (kept across restarts)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.spool_dir = log_dir / f"spool-{name}"
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **env,
            "CALLPIPE_HTTP_PORT": str(self.port),
            "CALLPIPE_SPOOL_DIR": str(self.spool_dir),
        }
        self._log_path = log_dir / f"ingress-{name}.log"
        self.process = CallpipeProcess(["ingress"], self._env, self._log_path)
        self.exits: list[int] = []

    async def start(self, session: aiohttp.ClientSession, *, connected: bool = True) -> None:
        """Start, and wait until ready (`connected`: with its broker link up, not spooling)."""
        self.process = CallpipeProcess(["ingress"], self._env, self._log_path)
        await self.process.start()

        async def ready() -> bool:
            try:
                async with session.get(f"{self.url}/readyz") as response:
                    body = await response.json()
                    return response.status == 200 and (not connected or "spooling" not in body)
            except aiohttp.ClientError:
                return False

        await wait_for(ready, seconds=30, what=f"ingress {self.name} ready")

    async def spooled(self, session: aiohttp.ClientSession) -> float:
        """The webhooks its spool holds now."""
        async with session.get(f"{self.url}/metrics") as response:
            text = await response.text()
        match = re.search(r"^callpipe_ingress_spool_messages (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def stop(self) -> None:
        code = await self.process.stop()
        if code is not None:
            self.exits.append(code)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""


def call_body(call_id: str, n: int, kind: str) -> bytes:
    """A Roistat-shaped webhook: the call start, or the call end with its outcome."""
    body: dict[str, Any] = {
        "id": call_id,
        "caller": f"7999{n:07d}",
        "callee": "74950001122",
        "date": "2026-11-25 10:00:00",
        "visit_id": str(100000 + n),
        "marker": "faults",
        "utm_source": "fault-suite",
    }
    if kind == "end":
        body |= {
            "status": ("ANSWER", "NOANSWER", "BUSY")[n % 3],
            "duration": n % 300,
            "file_id": f"f{n}",
            "link": f"https://rec.example/{n}.mp3",
        }
    return codec.dumps(body)


class Load:
    """Open-loop paced webhooks (call starts, each call's end `lag` webhooks later) and a
    ledger of every id and its answer. Posts through a client-side balancer: a target that
    refuses the connection (nothing was sent) is skipped for the next, as a load balancer
    with `proxy_next_upstream error` does. One connection per webhook, as Roistat sends."""

    def __init__(self, targets: list[str], calls: int, rate: float, lag: int = 20) -> None:
        self.targets = targets
        self.rate = rate
        self.plan: list[tuple[str, int, Kind]] = []
        for step in range(calls + lag):
            if step < calls:
                self.plan.append((f"c{step}", step, "start"))
            if step >= lag:
                self.plan.append((f"c{step - lag}", step - lag, "end"))
        self.answers: list[Answer] = []
        self.issued = 0
        self.in_flight = 0

    @property
    def total(self) -> int:
        return len(self.plan)

    async def run(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks = []
        for i, (call_id, n, kind) in enumerate(self.plan):
            # Pacing, not waiting for a condition: webhook i leaves at i / rate.
            await asyncio.sleep(max(0.0, started + i / self.rate - loop.time()))
            tasks.append(asyncio.create_task(self._post(session, i, call_id, n, kind)))
            self.issued += 1
        await asyncio.gather(*tasks)

    async def reached(self, fraction: float) -> None:
        """Wait until this share of the load has been sent."""

        async def sent() -> bool:
            return self.issued >= fraction * self.total

        await wait_for(sent, seconds=60, what=f"{fraction:.0%} of the load sent")

    async def _post(
        self, session: aiohttp.ClientSession, i: int, call_id: str, n: int, kind: Kind
    ) -> None:
        event_id = f"{PROJECT}:{call_id}:{kind}"
        body = call_body(call_id, n, kind)
        started = time.monotonic()
        self.in_flight += 1
        try:
            outcome, detail = await self._balanced(session, i, kind, body, event_id)
        finally:
            self.in_flight -= 1
        self.answers.append(
            Answer(event_id, call_id, kind, outcome, detail, time.monotonic() - started)
        )

    async def _balanced(
        self, session: aiohttp.ClientSession, i: int, kind: Kind, body: bytes, event_id: str
    ) -> tuple[str, str]:
        detail = "no target"
        for k in range(len(self.targets)):
            target = self.targets[(i + k) % len(self.targets)]
            url = f"{target}/roistat/{TOKEN}/call-{kind}"
            try:
                async with session.post(url, data=body) as response:
                    text = await response.text()
                    if response.status != 200:
                        return REFUSED, f"{response.status} {text[:200]}"
                    answer = codec.loads(text)
                    if answer.get("event_id") != event_id:
                        return REFUSED, f"200 for another id: {text[:200]}"
                    return (SPOOLED if answer.get("spooled") else OK), target
            except aiohttp.ClientConnectorError as exc:
                detail = f"{target}: {exc}"  # refused before anything was sent: next target
            except (aiohttp.ClientError, TimeoutError) as exc:
                return NO_ANSWER, f"{target}: {type(exc).__name__}: {exc}"
        return NO_ANSWER, detail


class Rig:
    """One scenario's namespace, processes and checks."""

    def __init__(
        self,
        amqp_url: str,
        database_url: str,
        log_dir: Path,
        *,
        ingresses: int = 1,
        failpoint: str | None = None,
        kills: int = 0,
    ) -> None:
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.log_dir = log_dir
        self.namespace = f"cpf_{uuid.uuid4().hex[:12]}"
        self.topology = Topology(self.namespace)
        self.check_queue = f"{self.namespace}.faultcheck"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLPIPE_")}
        env |= {
            "CALLPIPE_AMQP_URL": amqp_url,
            "CALLPIPE_DATABASE_URL": database_url,
            "CALLPIPE_NAMESPACE": self.namespace,
            "CALLPIPE_TOKENS": f"{PROJECT}:{TOKEN}",
            "CALLPIPE_HTTP_HOST": "127.0.0.1",
            "CALLPIPE_SHUTDOWN_TIMEOUT_S": "10",
            "CALLPIPE_LOG_LEVEL": "INFO",
        }
        # One delivery at a time in an armed worker: the failpoint's delivery is the only one
        # in its crash window, so exactly which events may come twice is known.
        worker_env = env | {"CALLPIPE_PREFETCH": "1" if failpoint else "16"}
        self.prefetch = 1 if failpoint else 16
        self.workers = {
            kind: SupervisedWorker(kind, worker_env, log_dir, failpoint, kills) for kind in KINDS
        }
        self.ingresses = [Ingress(chr(ord("a") + i), env, log_dir) for i in range(ingresses)]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        self.facts: dict[str, Any] = {}
        self.problems: list[str] = []

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._declare()
        for worker in self.workers.values():
            await worker.start()
        await asyncio.gather(*(ingress.start(self.session) for ingress in self.ingresses))
        await wait_for(self._consuming, seconds=30, what="both workers consuming")

    async def stop(self) -> None:
        """Stop every process; keep the namespace until `remove` (the check reads it)."""
        if self.session.closed:
            return
        await asyncio.gather(
            *(ingress.stop() for ingress in self.ingresses),
            *(worker.stop() for worker in self.workers.values()),
        )
        await self.session.close()

    async def _declare(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection, connection.channel() as channel:
            await declare_topology(channel, self.topology)
            queue = await channel.declare_queue(
                self.check_queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(self.topology.events_exchange, routing_key="#")
        conn = await asyncpg.connect(self.database_url)
        try:
            await migrate(conn, self.namespace)
        finally:
            await conn.close()

    async def remove(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection, connection.channel() as channel:
            await delete_topology(channel, self.topology)
            await channel.queue_delete(self.check_queue)
        conn = await asyncpg.connect(self.database_url)
        try:
            await drop_schema(conn, self.namespace)
        finally:
            await conn.close()

    async def _consuming(self) -> bool:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection, connection.channel() as channel:
            for kind in KINDS:
                queue = await channel.declare_queue(self.topology.call_queue(kind), passive=True)
                if not queue.declaration_result.consumer_count:
                    return False
        return True

    # ---- after the fault --------------------------------------------------------------------

    async def drained(self, answers: list[Answer]) -> bool:
        """Every webhook answered 200 is stored and published, the spools and the work queues
        are empty."""
        accepted = {answer.event_id for answer in answers if answer.accepted}
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                f'SELECT event_id FROM "{self.namespace}".call_events '
                "WHERE published_at IS NOT NULL"
            )
        finally:
            await conn.close()
        if not accepted <= {row["event_id"] for row in rows}:
            return False
        for ingress in self.ingresses:
            if await ingress.spooled(self.session):
                return False
        return await self.work_queues_empty()

    async def work_queues_empty(self) -> bool:
        listing = await asyncio.to_thread(
            rabbitmqctl, "list_queues", "name", "messages", "--no-table-headers"
        )
        for line in listing.splitlines():
            name, _, count = line.partition("\t")
            if name.startswith(f"{self.namespace}.call-") and count.strip() != "0":
                return False
        return True

    async def stored(self) -> Stored:
        conn = await asyncpg.connect(self.database_url)
        try:
            events = await conn.fetch(
                "SELECT event_id, published_at IS NOT NULL AS published"
                f' FROM "{self.namespace}".call_events'
            )
            calls = await conn.fetch(
                "SELECT call_id, start_received_at IS NOT NULL AS s,"
                " end_received_at IS NOT NULL AS e, revision"
                f' FROM "{self.namespace}".calls'
            )
        finally:
            await conn.close()
        copies, mislabelled = await self._collect_events()
        return Stored(
            published={r["event_id"] for r in events if r["published"]},
            unpublished={r["event_id"] for r in events if not r["published"]},
            halves={
                r["call_id"]: {k for k, v in (("start", r["s"]), ("end", r["e"])) if v}
                for r in calls
            },
            revisions={r["call_id"]: r["revision"] for r in calls},
            events=copies,
            mislabelled=mislabelled,
        )

    async def _collect_events(self) -> tuple[Counter[str], int]:
        """Every event on the check queue, up to a marker published behind them all."""
        copies: Counter[str] = Counter()
        mislabelled = 0
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.topology.events_exchange)
            await exchange.publish(
                aio_pika.Message(b"{}", message_id=MARKER), routing_key="faultcheck.marker"
            )
            await channel.set_qos(prefetch_count=256)
            queue = await channel.get_queue(self.check_queue)
            async with queue.iterator(timeout=30) as messages:
                async for message in messages:
                    await message.ack()
                    if message.message_id == MARKER:
                        break
                    copies[message.message_id or ""] += 1
                    if codec.loads(message.body).get("event_id") != message.message_id:
                        mislabelled += 1
        return copies, mislabelled

    def logs(self) -> dict[str, str]:
        found = {f"ingress-{i.name}": i.log() for i in self.ingresses}
        found |= {f"worker-{w.kind}": w.log() for w in self.workers.values()}
        return found

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name, text in self.logs().items():
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {name} (last {lines} lines; all in {self.log_dir}) ---\n{tail}")
        return "\n".join(parts)
