"""Stale calls, the pure parts: the `call.stale` envelope, its routing key, the settings, and
the sweep loop against an in-memory store."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from callpipe_testing import wait_for
from pydantic import ValidationError

from infra.settings import Settings, env_variable
from schemas.events import CallFields
from schemas.topology import event_routing_key, routing_key_of, stale_event_id
from workers.errors import TransientError
from workers.migrate import MIGRATIONS_DIR
from workers.stale import StaleSweeper, build_stale_event
from workers.stale_store import LOCK_DUE, StaleRenderer
from workers.storage import EventSender

CALLED = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
STALE = datetime(2026, 11, 25, 7, 31, tzinfo=UTC)
START_PAYLOAD = {"id": "100500", "caller": "79990009911", "date": "2026-11-25 10:00:00"}


def stale_call(**fields: Any) -> CallFields:
    values: dict[str, Any] = {
        "call_id": "100500",
        "caller": "+79990009911",
        "called_at": CALLED,
        "revision": 1,
        "start_received_at": CALLED,
        "stale_at": STALE,
    }
    return CallFields(**(values | fields))


def test_the_stale_event_carries_the_marked_row_and_the_start_payload() -> None:
    event = build_stale_event("shop", stale_call(), START_PAYLOAD)
    assert event.event_id == "shop:100500:stale" == stale_event_id("shop", "100500")
    assert (event.type, event.schema_) == ("call.stale", "callpipe.call.v1")
    assert (event.occurred_at, event.received_at) == (CALLED, STALE)
    assert event.call.stale_at == STALE
    assert event.raw == START_PAYLOAD
    wire = event.to_json_dict()
    assert wire["call"]["stale_at"] == "2026-11-25T07:31:00Z"
    assert routing_key_of(wire) == "call.stale"


def test_a_call_not_marked_has_no_stale_event() -> None:
    with pytest.raises(ValueError, match="not marked stale"):
        build_stale_event("shop", stale_call(stale_at=None), START_PAYLOAD)


@pytest.mark.parametrize("outcome", [None, "missed", "answered"])
def test_the_stale_routing_key_ignores_the_outcome(outcome: str | None) -> None:
    assert event_routing_key("call.stale", outcome) == "call.stale"


def test_stale_settings_defaults_and_variables() -> None:
    settings = Settings()
    assert (settings.stale_after_min, settings.stale_sweep_s) == (30, 30.0)
    assert env_variable("stale_after_min") == "CALLPIPE_STALE_AFTER_MIN"
    assert env_variable("stale_sweep_s") == "CALLPIPE_STALE_SWEEP_S"


@pytest.mark.parametrize("field", [{"stale_after_min": 0}, {"stale_sweep_s": 0}])
def test_stale_settings_refuse_zero(field: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**field)


def test_the_sweep_reads_what_the_partial_index_holds() -> None:
    migration = (MIGRATIONS_DIR / "0004_stale_calls.sql").read_text(encoding="utf-8")
    index = re.search(
        r"CREATE INDEX calls_awaiting_end ON calls \((\w+)\)\s+WHERE ([^;]+);", migration
    )
    assert index is not None
    column, predicate = index.groups()
    assert f"c.{column} <" in LOCK_DUE
    for condition in predicate.split(" AND "):
        assert f"c.{condition.strip()}" in LOCK_DUE
    assert "FOR UPDATE OF c SKIP LOCKED" in LOCK_DUE


class FakeStaleStore:
    """Due calls in memory: each `mark_stale` takes up to `limit` of them."""

    def __init__(self, due: int, failures: int = 0) -> None:
        self.due = due
        self.failures = failures
        self.calls: list[int] = []

    async def mark_stale(
        self, after_min: int, limit: int, render: StaleRenderer, send: EventSender
    ) -> int:
        self.calls.append(limit)
        if self.failures:
            self.failures -= 1
            raise TransientError("database: down")
        marked = min(limit, self.due)
        for n in range(marked):
            await send(render("shop", stale_call(call_id=f"c{self.due - n}"), {}).to_json_dict())
        self.due -= marked
        return marked


class FakeEvents:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def publish_event(self, event: dict[str, Any]) -> None:
        self.sent.append(event)


class FakeEnds:
    """`worker end`'s progress: a reason to wait per look, from a script; then caught up."""

    def __init__(self, *waits: str) -> None:
        self.waits = list(waits)
        self.looks = 0

    async def why_wait(self) -> str | None:
        self.looks += 1
        return self.waits.pop(0) if self.waits else None


async def run_until_sent(sweeper: StaleSweeper, events: FakeEvents, n: int, what: str) -> None:
    """Run the sweep loop until `n` events are sent, then stop it."""
    stop = asyncio.Event()
    running = asyncio.create_task(sweeper.run(stop))

    async def all_sent() -> bool:
        return len(events.sent) == n

    try:
        await wait_for(all_sent, seconds=5, what=what)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=5)


async def test_one_sweep_takes_batches_until_none_is_due() -> None:
    store, events = FakeStaleStore(due=7), FakeEvents()
    sweeper = StaleSweeper(store, events, FakeEnds(), after_min=30, every_s=30, batch_size=3)
    assert await sweeper.sweep(asyncio.Event()) == 7
    assert store.calls == [3, 3, 3]
    assert len({event["event_id"] for event in events.sent}) == 7
    assert {event["type"] for event in events.sent} == {"call.stale"}


async def test_a_failed_sweep_is_tried_again_at_the_next_interval() -> None:
    store, events = FakeStaleStore(due=2, failures=2), FakeEvents()
    sweeper = StaleSweeper(store, events, FakeEnds(), after_min=30, every_s=0.01)
    await run_until_sent(sweeper, events, 2, "both stale events after two failed sweeps")
    assert len(store.calls) >= 3


async def test_a_stop_ends_the_loop_without_waiting_for_the_interval() -> None:
    sweeper = StaleSweeper(
        FakeStaleStore(due=0), FakeEvents(), FakeEnds(), after_min=30, every_s=3600
    )
    stop = asyncio.Event()
    running = asyncio.create_task(sweeper.run(stop))
    await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(running, timeout=5)


async def test_no_call_is_marked_while_call_ends_wait_and_the_wait_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`worker end` behind: its calls' starts look old, but their ends may be in the queue."""
    caplog.set_level(logging.INFO, logger="workers.stale")
    store, events = FakeStaleStore(due=2), FakeEvents()
    ends = FakeEnds("no worker end consumes x.call-end", "3 call ends wait in x.call-end")
    sweeper = StaleSweeper(store, events, ends, after_min=30, every_s=0.01)
    await run_until_sent(sweeper, events, 2, "the stale events once call ends are caught up")
    assert ends.looks >= 3
    # A sweep after every look but the two waits and the first look caught up.
    assert len(store.calls) == ends.looks - 3
    said = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert said[:2] == [
        "stale sweep waits: no worker end consumes x.call-end",
        "stale sweep resumes: call ends are caught up",
    ]
