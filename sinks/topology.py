"""A sink's queues: `{ns}.sink.{name}` bound to `{ns}.events`, and one delay queue per retry step.

A delay queue holds a failed delivery for its TTL, then dead-letters it back into the sink's
queue: the wait is on the broker's disk, so a restart of the sink process forgets nothing.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractChannel

from infra.broker import work_queue_arguments
from schemas.topology import Topology
from sinks.config import SinkConfig
from sinks.retry import delay_label


def delay_queue(topology: Topology, sink: str, delay_s: float) -> str:
    return f"{topology.sink_queue(sink)}.retry.{delay_label(delay_s)}"


def sink_of_queue(topology: Topology, queue: str | None) -> str | None:
    """The sink whose queue (`{ns}.sink.NAME`) or delay queue (`{ns}.sink.NAME.retry.5s`)
    this is, if any."""
    prefix = topology.sink_queue("x").removesuffix("x")
    if not queue or not queue.startswith(prefix):
        return None
    return queue.removeprefix(prefix).split(".", 1)[0] or None


def delay_queue_arguments(topology: Topology, sink: str, delay_s: float) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": round(delay_s * 1000),
        # Back through the default exchange, straight into the sink's own queue.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": topology.sink_queue(sink),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_sink(channel: AbstractChannel, topology: Topology, config: SinkConfig) -> None:
    """Declare the sink's queue, its bindings and its delay queues. Idempotent.

    Bindings are only added: a key removed from the sinks file stays bound until the queue
    is unbound or deleted by hand (RabbitMQ cannot list bindings over AMQP).
    """
    queue = await channel.declare_queue(
        topology.sink_queue(config.name), durable=True, arguments=work_queue_arguments(topology)
    )
    for key in config.binding_keys:
        await queue.bind(topology.events_exchange, routing_key=key)
    for delay_s in sorted(set(config.retry_delays_s)):
        await channel.declare_queue(
            delay_queue(topology, config.name, delay_s),
            durable=True,
            arguments=delay_queue_arguments(topology, config.name, delay_s),
        )


async def delete_sink(channel: AbstractChannel, topology: Topology, config: SinkConfig) -> None:
    for delay_s in sorted(set(config.retry_delays_s)):
        await channel.queue_delete(delay_queue(topology, config.name, delay_s))
    await channel.queue_delete(topology.sink_queue(config.name))
