"""RabbitMQ adapter: robust connections and the topology (confirmed publishing:
`infra.confirmed_publisher`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)
from yarl import URL

from infra import frame_reader
from infra.kept_queues import DEFAULT_BOUNDS, KeptQueueBounds, QueueBound, kept_queue_arguments
from infra.retry import retry_until_done
from schemas.topology import DELIVERY_LIMIT, Topology

log = logging.getLogger(__name__)


# aio-pika waits 5 s between reconnect attempts by default: a restarted broker would go
# unnoticed that long (DESIGN, known pitfalls).
RECONNECT_S = 1.0


def work_queue_arguments(topology: Topology) -> dict[str, Any]:
    """Durable quorum queue, bounded redelivery, dead letters kept at least once."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": topology.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(
    channel: AbstractChannel, topology: Topology, bounds: KeptQueueBounds | None = None
) -> None:
    """Declare every exchange, queue and binding of the namespace. Idempotent.

    `bounds` sizes `{ns}.dead` and `{ns}.rejected` when they are new (pass
    `bounds_of(settings)`; default: the settings' defaults); queues declared earlier are left
    as they are.
    """
    bounds = bounds or DEFAULT_BOUNDS
    webhooks = await channel.declare_exchange(
        topology.webhooks_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    await channel.declare_exchange(
        topology.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead = await channel.declare_exchange(
        topology.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await declare_kept_queue(channel, topology.dead_queue, bounds.dead)
    await dead_queue.bind(dead, routing_key="")
    for name, binding_key in topology.work_queues.items():
        if name == topology.rejected_queue:
            queue = await declare_kept_queue(channel, name, bounds.rejected)
        else:
            queue = await channel.declare_queue(
                name, durable=True, arguments=work_queue_arguments(topology)
            )
        await queue.bind(webhooks, routing_key=binding_key)


_told_unbounded: set[str] = set()


async def declare_kept_queue(
    channel: AbstractChannel, name: str, bound: QueueBound
) -> AbstractQueue:
    """A kept queue: declared with its bound if new, else left as it is (RabbitMQ refuses a
    re-declare with other arguments, and closes the channel that tries)."""
    mismatch = await probe_declare(channel, name, kept_queue_arguments(bound))
    if mismatch and name not in _told_unbounded:
        _told_unbounded.add(name)
        log.warning(
            "%s was declared earlier with other arguments (%s), so it is not bounded at %s "
            "unless a policy does: `callpipe setup` prints the rabbitmqctl line that bounds it",
            name,
            mismatch,
            bound.describe(),
        )
    return await channel.declare_queue(name, passive=True)


async def probe_declare(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> str | None:
    """Declare a durable queue on a throwaway channel: None if it now exists with exactly these
    arguments, else the broker's word on the one that differs."""
    underlay = await channel.get_underlay_channel()
    probe = await underlay.connection.channel()
    try:
        await probe.queue_declare(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        found = _INEQUIVALENT.search(str(exc))
        return found.group(0) if found else str(exc)
    finally:
        if not probe.is_closed:
            await probe.close()
    return None


_INEQUIVALENT = re.compile(r"inequivalent arg '[^']*'[^\"]*")


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Remove every object of the namespace (tests and `callpipe teardown`)."""
    for name in [*topology.work_queues, topology.dead_queue]:
        await channel.queue_delete(name)
    for name in (topology.webhooks_exchange, topology.events_exchange, topology.dead_exchange):
        await channel.exchange_delete(name)


async def connect(
    url: str, *, name: str, stop: asyncio.Event | None = None
) -> AbstractRobustConnection:
    """A robust connection, retried with backoff until the broker answers (or `stop` is set)."""
    _read_frames_in_bulk()
    return await retry_until_done(
        f"connecting to the broker as {name}",
        lambda: connect_once(url, name=name),
        retry_on=(TimeoutError, OSError, aiormq.exceptions.AMQPError),
        stop=stop,
    )


async def connect_once(url: str, *, name: str) -> AbstractRobustConnection:
    """One attempt, as `aio_pika.connect_robust` makes it, but a failed one closes the
    connection object it made. aio-pika's `connect_robust` drops it unclosed, and its
    finalizer then creates a `close()` coroutine that, collected away from the event loop
    (in another thread, or after the loop), is never awaited: a warning at a random place."""
    connection = aio_pika.RobustConnection(
        URL(url), client_properties={"connection_name": name}, reconnect_interval=RECONNECT_S
    )
    try:
        await connection.connect()
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection


@functools.cache
def _read_frames_in_bulk() -> bool:
    """Once per process: connections read their frames in bulk (`infra.frame_reader`)."""
    installed = frame_reader.install()
    if not installed:
        log.warning(
            "this aiormq is not shaped as infra.frame_reader expects: frames are "
            "read aiormq's own way (slower, not wrong)"
        )
    return installed


def plain_headers(headers: HeadersType | None) -> dict[str, str]:
    """AMQP headers with text values (bytes decoded), for reading ours back."""
    result: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if isinstance(value, bytes):
            result[key] = value.decode("utf-8", "replace")
        elif value is not None:
            result[key] = str(value)
    return result
