"""Test helpers for sinks: run them in the test's loop, publish events, fake destinations."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from infra.settings import Settings
from schemas import codec
from sinks.config import SinkConfig
from sinks.service import run_sinks
from sinks.topology import declare_sink, delete_sink


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def envelope(
    call_id: str,
    *,
    project: str = "acme",
    outcome: str | None = "missed",
    caller: str | None = "+79990009911",
    called_at: str = "2026-11-25T07:00:00Z",
    **call: Any,
) -> dict[str, Any]:
    kind = "end" if outcome else "start"
    return {
        "event_id": f"{project}:{call_id}:{kind}",
        "type": "call.ended" if outcome else "call.started",
        "schema": "callpipe.call.v1",
        "occurred_at": called_at,
        "received_at": called_at,
        "project": project,
        "call": {
            "call_id": call_id,
            "caller": caller,
            "callee": "+74951234567",
            "called_at": called_at,
            "outcome": outcome,
            "status": {"missed": "NOANSWER", "answered": "ANSWER"}.get(outcome or ""),
            **call,
        },
        "raw": {"id": call_id},
    }


def routing_key(event: dict[str, Any]) -> str:
    outcome = event["call"]["outcome"]
    return f"call.ended.{outcome}" if outcome else "call.started"


async def publish_events(
    amqp: AbstractRobustConnection, settings: Settings, events: list[dict[str, Any]]
) -> None:
    """Publish envelopes to `{ns}.events` as the workers do (persistent, confirmed)."""
    async with amqp.channel(publisher_confirms=True) as channel:
        exchange = await channel.get_exchange(settings.topology.events_exchange)
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        codec.dumps(event),
                        message_id=event["event_id"],
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key(event),
                )
                for event in events
            )
        )


class RunningSinks:
    """Sinks running in the test's event loop; their queues declared first, deleted after."""

    def __init__(self, amqp: AbstractRobustConnection) -> None:
        self._amqp = amqp
        self._runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        self._declared: list[tuple[Settings, SinkConfig]] = []

    async def declare(self, settings: Settings, configs: list[SinkConfig]) -> None:
        async with self._amqp.channel() as channel:
            for config in configs:
                await declare_sink(channel, settings.topology, config)
                self._declared.append((settings, config))

    async def start(self, settings: Settings, configs: list[SinkConfig]) -> None:
        await self.declare(settings, configs)
        stop = asyncio.Event()
        task = asyncio.create_task(run_sinks(settings, configs, stop), name="sinks")
        self._runs.append((stop, task))

    async def stop(self) -> None:
        for stop, _ in self._runs:
            stop.set()
        for _, task in self._runs:
            await asyncio.wait_for(task, timeout=20)
        self._runs.clear()

    async def remove(self) -> None:
        try:
            await self.stop()
        finally:  # even after a crashed run: the shared broker keeps no queue of ours
            async with self._amqp.channel() as channel:
                for settings, config in self._declared:
                    await delete_sink(channel, settings.topology, config)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeServer:
    """A local aiohttp app standing in for a third-party HTTP API."""

    handler: Handler
    requests: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> str:
        async def record(request: web.Request) -> web.StreamResponse:
            self.requests.append((request.path, await request.read(), dict(request.headers)))
            return await self.handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
