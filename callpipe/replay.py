"""`callpipe replay-dead`: now `callpipe dead requeue --all`, kept for existing scripts."""

from __future__ import annotations

from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection

from callpipe.dead_operations import KeptQueue, requeue_letters
from schemas.topology import Topology


@dataclass
class ReplayReport:
    replayed: int = 0
    kept: int = 0

    def line(self) -> str:
        return f"replayed {self.replayed} dead letters; kept {self.kept} that cannot be requeued"


async def replay_dead(
    connection: AbstractRobustConnection, topology: Topology, *, limit: int, timeout_s: float
) -> ReplayReport:
    """Send up to `limit` dead letters back where they came from, as `dead requeue --all`
    does: call webhooks to `{ns}.webhooks`, a sink's events to that sink's queue. Each is
    acked in `{ns}.dead` only after the broker confirmed its copy; the rest stay, in order."""
    outcome = await requeue_letters(
        connection, KeptQueue("dead", topology), None, timeout_s=timeout_s, limit=limit
    )
    return ReplayReport(len(outcome.requeued), outcome.read - len(outcome.requeued))
