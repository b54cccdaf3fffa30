"""/healthz, /readyz and /metrics of the workers of one process (CALLPIPE_METRICS_PORT).

Ready means every worker of the process takes deliveries: it is consuming, its consume
channel is open, and the database answered `SELECT 1` within the last PROBE_FRESH_S (probed
on a connection of its own when a readiness check asks, at most PROBE_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.runner import BACKLOG, StartupError, listen
from infra.settings import Settings
from schemas.topology import Kind
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
PROBE_FRESH_S = 5.0


class Consuming(Protocol):
    @property
    def not_consuming(self) -> str | None: ...


class DatabaseProbe:
    """`SELECT 1` on a connection of its own: a hung database keeps no pool connection."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._answered_at: float | None = None
        self._lock = asyncio.Lock()

    async def answers(self) -> bool:
        """True if the database answered within the last PROBE_FRESH_S, or answers now."""
        async with self._lock:  # concurrent checks share one probe
            answered_at = self._answered_at
            if answered_at is not None and time.monotonic() - answered_at < PROBE_FRESH_S:
                return True
            if await self._probe():
                self._answered_at = time.monotonic()
                return True
            self._answered_at = None
            return False

    async def _probe(self) -> bool:
        conn: asyncpg.Connection | None = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                conn = await asyncpg.connect(self._url, timeout=PROBE_TIMEOUT_S)
                await conn.fetchval("SELECT 1")
                await conn.close()
            return True
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.debug("readiness: database does not answer: %r", exc)
            return False
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()


class WorkerHealth:
    """One worker's readiness: starting until its consumer runs, then as the module says."""

    def __init__(self, kind: Kind, database_url: str) -> None:
        self.kind = kind
        self.consumer: Consuming | None = None
        self._database = DatabaseProbe(database_url)

    async def not_ready(self) -> str | None:
        """Why this worker is not ready (None: it is)."""
        if self.consumer is None:
            return "starting (waiting for the database and the broker)"
        reason = self.consumer.not_consuming
        if reason is not None:
            return reason
        if not await self._database.answers():
            return "database unreachable"
        return None


class WorkerMonitor:
    """The metrics and the readiness of every worker in this process, served by one app."""

    def __init__(self) -> None:
        self.metrics = WorkerMetrics()
        self._workers: list[WorkerHealth] = []

    def watch(self, kind: Kind, database_url: str) -> WorkerHealth:
        health = WorkerHealth(kind, database_url)
        self._workers.append(health)
        return health

    def forget(self, health: WorkerHealth) -> None:
        self._workers.remove(health)

    async def readiness(self) -> dict[str, str]:
        """State of each worker by kind (`start`, `end`, `end#2`...): "consuming" or why not."""
        reasons = await asyncio.gather(*(worker.not_ready() for worker in self._workers))
        states: dict[str, str] = {}
        for worker, reason in zip(self._workers, reasons, strict=True):
            name: str = worker.kind
            n = 1
            while name in states:
                n += 1
                name = f"{worker.kind}#{n}"
            states[name] = reason or "consuming"
        return states


MONITOR = web.AppKey("monitor", WorkerMonitor)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    workers = await request.app[MONITOR].readiness()
    if workers and all(state == "consuming" for state in workers.values()):
        return web.json_response({"status": "ready", "workers": workers})
    reason = "no worker running" if not workers else "not consuming"
    return web.json_response({"status": reason, "workers": workers}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[MONITOR].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def init_worker_app(monitor: WorkerMonitor) -> web.Application:
    app = web.Application()
    app[MONITOR] = monitor
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_worker_endpoints(
    settings: Settings, monitor: WorkerMonitor, stop: asyncio.Event
) -> None:
    """/healthz, /readyz, /metrics of this process's workers on CALLPIPE_METRICS_PORT until
    `stop`. Unlike the ingress's port, one in use does not stop the workers: calls are still
    stored, the error says which variable to change."""
    try:
        sockets = listen(settings.http_host, settings.metrics_port)
    except StartupError as exc:
        log.error(
            "workers serve no /healthz, /readyz, /metrics: %s (give each worker process its own"
            " CALLPIPE_METRICS_PORT, or 0 for none)",
            exc,
        )
        await stop.wait()  # a component that returns would stop the whole process
        return
    try:
        runner = web.AppRunner(init_worker_app(monitor), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            for sock in sockets:
                await web.SockSite(runner, sock, backlog=BACKLOG).start()
            log.info("worker endpoints on http://%s:%d", settings.http_host, settings.metrics_port)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for sock in sockets:
            sock.close()
