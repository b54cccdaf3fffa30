"""`callpipe replay-dead`: send dead letters back to the workers, once their cause is fixed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection

from callpipe.broker import ConfirmedPublisher, PublishFailedError, declare_topology
from schemas.topology import HEADER_ERROR, ROUTING_KEY_BY_KIND, Topology

log = logging.getLogger(__name__)

REPLAYABLE = frozenset(ROUTING_KEY_BY_KIND.values())
# What the broker and the workers added on the way to `{ns}.dead`.
DROPPED_HEADERS = frozenset(
    {
        HEADER_ERROR,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


@dataclass
class ReplayReport:
    replayed: int = 0
    kept: int = 0

    def line(self) -> str:
        return f"replayed {self.replayed} dead letters; kept {self.kept} that are not webhooks"


async def replay_dead(
    connection: AbstractRobustConnection, topology: Topology, *, limit: int, timeout_s: float
) -> ReplayReport:
    """Republish up to `limit` call webhooks from `{ns}.dead` to `{ns}.webhooks`.

    Each is acked in the dead queue only after the broker confirmed its copy, so a failure
    half-way loses nothing. Only the messages present at the start are looked at, once:
    anything else (not a call webhook) goes back to the end of `{ns}.dead` for a human.
    """
    report = ReplayReport()
    channel = await connection.channel()
    await declare_topology(channel, topology)
    queue = await channel.declare_queue(topology.dead_queue, passive=True)
    waiting = queue.declaration_result.message_count or 0
    publisher = await ConfirmedPublisher.open(connection, timeout_s)
    try:
        for _ in range(min(waiting, limit)):
            message = await queue.get(fail=False)
            if message is None:
                break
            routing_key = message.routing_key or ""
            replayable = routing_key in REPLAYABLE
            # Not a webhook: put at the back of {ns}.dead by a fresh publish, not by a requeue,
            # which would count towards a delivery limit (RabbitMQ 4 sets one by default).
            exchange = topology.webhooks_exchange if replayable else topology.dead_exchange
            headers = {
                key: value
                for key, value in (message.headers or {}).items()
                if not replayable or key not in DROPPED_HEADERS
            }
            try:
                await publisher.publish(
                    exchange,
                    routing_key,
                    message.body,
                    message_id=message.message_id or "",
                    headers=headers,
                )
            except PublishFailedError:
                await message.nack(requeue=True)
                raise
            await message.ack()
            if replayable:
                report.replayed += 1
            else:
                report.kept += 1
    finally:
        await publisher.close()
        await channel.close()
    return report
