"""List, show, requeue and purge `{ns}.dead` and `{ns}.rejected`, each in one safe scan.

Every operation reads the whole queue once (`QueueScan`): the messages it does not act on go
back in the order they were read, a requeued message is acked only after the broker
confirmed its copy, and a purge acks only the messages it selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from aio_pika.abc import AbstractRobustConnection

from callpipe.dead_letters import (
    Keep,
    Row,
    dead_reason,
    dead_source,
    dead_target,
    rejected_reason,
    rejected_target,
    row,
)
from callpipe.letters import Letter, age_seconds, now_utc
from callpipe.queue_scan import QueueScan, Target
from schemas.topology import HEADER_PROJECT, Topology

Which = Literal["dead", "rejected"]


@dataclass(frozen=True)
class KeptQueue:
    """`{ns}.dead` or `{ns}.rejected`, and what its messages mean."""

    which: Which
    topology: Topology

    @property
    def queue(self) -> str:
        return self.topology.dead_queue if self.which == "dead" else self.topology.rejected_queue

    @property
    def noun(self) -> str:
        return "dead letters" if self.which == "dead" else "rejected bodies"

    def source_and_reason(self, letter: Letter) -> tuple[str, str]:
        if self.which == "dead":
            return dead_source(letter, self.topology), dead_reason(letter)
        return letter.text(HEADER_PROJECT) or "?", rejected_reason(letter)

    def row(self, letter: Letter, now: datetime) -> Row:
        return row(letter, *self.source_and_reason(letter), now)

    def target(self, letter: Letter, now: datetime) -> Target | Keep:
        if self.which == "dead":
            return dead_target(letter, self.topology, now)
        return rejected_target(letter, self.topology, now)


@dataclass
class Listing:
    rows: list[Row]
    returned: int


async def list_letters(
    connection: AbstractRobustConnection, kept: KeptQueue, *, timeout_s: float
) -> Listing:
    now = now_utc()
    rows: list[Row] = []

    async def note(letter: Letter) -> None:
        rows.append(kept.row(letter, now))

    async with QueueScan(connection, kept.queue, timeout_s=timeout_s) as scan:
        await scan.each(note)
    return Listing(rows, scan.result.returned)


async def find_letters(
    connection: AbstractRobustConnection, kept: KeptQueue, letter_id: str, *, timeout_s: float
) -> list[Letter]:
    """Every message with this id (exact copies share one), left in the queue."""
    found: list[Letter] = []

    async def match(letter: Letter) -> None:
        if letter.id == letter_id:
            found.append(letter)

    async with QueueScan(connection, kept.queue, timeout_s=timeout_s) as scan:
        await scan.each(match)
    return found


@dataclass
class RequeueOutcome:
    read: int = 0
    requeued: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (id, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why): still there
    missing: list[str] = field(default_factory=list)  # ids asked for and not found


async def requeue_letters(
    connection: AbstractRobustConnection,
    kept: KeptQueue,
    ids: set[str] | None,
    *,
    timeout_s: float,
    limit: int | None = None,
) -> RequeueOutcome:
    """Send the messages with these ids (None: all) back where they came from."""
    now = now_utc()
    outcome = RequeueOutcome()
    seen: set[str] = set()
    sent = 0

    async def requeue(letter: Letter) -> None:
        nonlocal sent
        letter_id = letter.id
        if ids is not None and letter_id not in ids:
            return
        seen.add(letter_id)
        target = kept.target(letter, now)
        if isinstance(target, Keep):
            outcome.kept.append((letter_id, target.reason))
        elif limit is None or sent < limit:
            sent += 1
            await scan.forward(letter, target)

    async with QueueScan(connection, kept.queue, timeout_s=timeout_s) as scan:
        await scan.each(requeue)
    outcome.read = scan.result.read
    outcome.requeued = scan.result.forwarded
    outcome.failed = scan.result.failed
    outcome.missing = sorted((ids or set()) - seen)
    return outcome


@dataclass
class PurgeOutcome:
    read: int = 0
    purged: list[str] = field(default_factory=list)
    undated: int = 0  # selected by id or not, but of unknown age: kept
    missing: list[str] = field(default_factory=list)


async def purge_letters(
    connection: AbstractRobustConnection,
    kept: KeptQueue,
    ids: set[str] | None,
    older_than_s: float | None,
    *,
    timeout_s: float,
) -> PurgeOutcome:
    """Remove for good the messages with these ids (None: any) older than `older_than_s`
    (None: any age). A message whose age is unknown is never removed by age."""
    now = now_utc()
    outcome = PurgeOutcome()
    seen: set[str] = set()

    async def purge(letter: Letter) -> None:
        letter_id = letter.id
        if ids is not None and letter_id not in ids:
            return
        seen.add(letter_id)
        if older_than_s is not None:
            age = age_seconds(letter, now)
            if age is None:
                outcome.undated += 1
                return
            if age < older_than_s:
                return
        await scan.drop(letter)

    async with QueueScan(connection, kept.queue, timeout_s=timeout_s) as scan:
        await scan.each(purge)
    outcome.read = scan.result.read
    outcome.purged = scan.result.dropped
    outcome.missing = sorted((ids or set()) - seen)
    return outcome
