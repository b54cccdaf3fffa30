"""Stale calls: a call start with no call end after `CALLPIPE_STALE_AFTER_MIN` gets one
`call.stale` event. Nothing is kept in memory: each `worker start` sweeps the `calls` table
every `CALLPIPE_STALE_SWEEP_S`, so a restart forgets nothing and replicas share the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.events import STALE_EVENT_TYPE, CallEvent, CallFields
from schemas.topology import stale_event_id
from workers.errors import PermanentError, TransientError
from workers.stale_store import StaleRenderer
from workers.storage import EventSender

log = logging.getLogger(__name__)

# Calls marked per transaction: a row lock and a confirm each, so a batch stays short.
BATCH_SIZE = 100


def build_stale_event(project: str, call: CallFields, raw: dict[str, Any]) -> CallEvent:
    """The `call.stale` envelope: the marked row, the call start's payload as `raw`, and the
    time it was marked as `received_at`. Pure."""
    if call.stale_at is None:
        raise ValueError(f"call {call.call_id!r} is not marked stale")
    return CallEvent(
        event_id=stale_event_id(project, call.call_id),
        type=STALE_EVENT_TYPE,
        occurred_at=call.called_at,
        received_at=call.stale_at,
        project=project,
        call=call,
        raw=raw,
    )


class EventPublisher(Protocol):
    """The port that sends an envelope to `{ns}.events`; raises `TransientError`."""

    async def publish_event(self, event: dict[str, Any]) -> None: ...


class EndProgress(Protocol):
    """The port that tells whether `worker end` has caught up (workers/end_queue.py)."""

    async def why_wait(self) -> str | None: ...


class StaleStore(Protocol):
    """The storage port of the sweep."""

    async def mark_stale(
        self, after_min: int, limit: int, render: StaleRenderer, send: EventSender
    ) -> int: ...


@dataclass(frozen=True)
class StaleSweeper:
    store: StaleStore
    events: EventPublisher
    ends: EndProgress
    after_min: int
    every_s: float
    batch_size: int = BATCH_SIZE

    async def sweep(self, stop: asyncio.Event) -> int:
        """Mark every call due now, a batch at a time; the number marked."""
        total = 0
        while True:
            marked = await self.store.mark_stale(
                self.after_min, self.batch_size, build_stale_event, self.events.publish_event
            )
            total += marked
            if marked < self.batch_size or stop.is_set():
                return total

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `every_s` until `stop`; a failed sweep is retried next time.

        A sweep needs `worker end` caught up at this look and at the one before: while call
        ends wait in their queue, their calls are not stale, only late, and the ends a worker
        held at the first look have had an interval to be stored."""
        caught_up = False  # at the look before
        waiting = False
        while not stop.is_set():
            try:
                if (why := await self.ends.why_wait()) is not None:
                    # Said once when the waiting begins; every sweep it holds back at DEBUG.
                    level = logging.DEBUG if waiting else logging.INFO
                    log.log(level, "stale sweep waits: %s", why)
                    waiting, caught_up = True, False
                elif not caught_up:
                    if waiting:
                        log.info("stale sweep resumes: call ends are caught up")
                    waiting, caught_up = False, True
                else:
                    marked = await self.sweep(stop)
                    if marked:
                        log.info("%d calls without their end marked stale", marked)
            except (TransientError, PermanentError) as exc:
                log.warning("stale sweep failed (next in %gs): %s", self.every_s, exc)
            except Exception:
                log.exception("stale sweep failed (next in %gs)", self.every_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every_s)


def start_sweeping(
    sweeper: StaleSweeper, stop: asyncio.Event, resources: AsyncExitStack, grace_s: float
) -> None:
    """Run the sweep beside the consumer; on the way out, let a batch in flight finish."""
    task = asyncio.create_task(sweeper.run(stop), name="stale-sweep")

    async def finish() -> None:
        if stop.is_set():  # a stop, not a failed start: the batch in flight may finish
            await asyncio.wait({task}, timeout=grace_s)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    resources.push_async_callback(finish)
