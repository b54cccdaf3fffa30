"""The rig of one fault scenario: its namespace, its processes and, after recovery and
drain, what storage and the event stream hold.

Each scenario gets a namespace, spool directories, ports and logs of its own. The ingress
and the workers run as the operator runs them (`callpipe ingress`, `callpipe worker start`,
`callpipe worker end`), workers restarted when they die as a supervisor would. Events are
counted from a durable queue of the rig's own bound to `{ns}.events` with `#`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
from callpipe_testing import wait_for
from fault_checker import Answer, Stored
from fault_load import PROJECT, TOKEN
from fault_processes import Ingress, SupervisedWorker
from service_control import rabbitmqctl

from infra.broker import declare_topology, delete_topology
from schemas import codec
from schemas.topology import KINDS, Topology
from workers.migrate import drop_schema, migrate

MARKER = "faultcheck:marker"


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
            # Four of the load's health checks: long enough for it to stop sending, short
            # enough for the suite's time.
            "CALLPIPE_DRAIN_S": "2",
        }
        # One delivery at a time in an armed worker: the failpoint's delivery is the only one
        # in its crash window, so exactly which events may come twice is known.
        worker_env = env | {
            "CALLPIPE_PREFETCH": "1" if failpoint else "16",
            "CALLPIPE_METRICS_PORT": "0",  # two workers per rig, many rigs: no fixed port
        }
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
