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
    half-way loses nothing. Only the messages present at the start are looked at once:
    anything else (not a call webhook) is put back and stays for a human.
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
            if message.routing_key not in REPLAYABLE:
                await message.nack(requeue=True)
                report.kept += 1
                continue
            headers = {
                key: value
                for key, value in (message.headers or {}).items()
                if key not in DROPPED_HEADERS
            }
            try:
                await publisher.publish(
                    topology.webhooks_exchange,
                    message.routing_key,
                    message.body,
                    message_id=message.message_id or "",
                    headers=headers,
                )
            except PublishFailedError:
                await message.nack(requeue=True)
                raise
            await message.ack()
            report.replayed += 1
    finally:
        await publisher.close()
        await channel.close()
    return report
