"""The ingress's one broker connection: connects in the background, never blocks start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from infra.broker import connect, declare_topology
from infra.confirmed_publisher import ConfirmedPublisher, PublishFailedError
from infra.kept_queues import DEFAULT_BOUNDS, KeptQueueBounds
from infra.retry import MAX_DELAY_S
from schemas.topology import Topology

log = logging.getLogger(__name__)


class BrokerLink:
    def __init__(
        self,
        amqp_url: str,
        topology: Topology,
        publish_timeout_s: float,
        bounds: KeptQueueBounds = DEFAULT_BOUNDS,
    ) -> None:
        self._amqp_url = amqp_url
        self._topology = topology
        self._bounds = bounds
        self._publish_timeout_s = publish_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._connecting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._connecting = asyncio.create_task(self._connect(), name="broker-connect")

    async def wait_ready(self) -> None:
        if self._connecting is not None:
            await self._connecting

    async def _connect(self) -> None:
        """Open the link, retrying every step: the broker may restart half-way through."""
        delay = 0.5
        while True:
            try:
                await self._open()
                return
            except Exception as exc:
                log.warning("broker link not set up (%r); retrying in %.1fs", exc, delay)
                await self._discard_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)

    async def _open(self) -> None:
        connection = await connect(self._amqp_url, name="callpipe-ingress")
        self._connection = connection
        channel = await connection.channel()
        await declare_topology(channel, self._topology, self._bounds)
        await channel.close()
        self._publisher = await ConfirmedPublisher.open(connection, self._publish_timeout_s)
        log.info("ingress connected to the broker")

    async def redeclare(self) -> None:
        """Declare the topology again: a queue deleted by hand makes every publish return."""
        if self._connection is None:
            return
        try:
            channel = await self._connection.channel()
            await declare_topology(channel, self._topology, self._bounds)
            await channel.close()
        except Exception as exc:
            log.warning("could not declare the topology again: %r", exc)

    async def _discard_connection(self) -> None:
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    @property
    def is_ready(self) -> bool:
        connection, publisher = self._connection, self._publisher
        return (
            connection is not None
            and publisher is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and publisher.is_open
        )

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, Any],
        timeout_s: float | None = None,
    ) -> None:
        if self._publisher is None:
            raise PublishFailedError("not connected to the broker yet")
        await self._publisher.publish(
            exchange, routing_key, body, message_id=message_id, headers=headers, timeout_s=timeout_s
        )

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        await self._discard_connection()
