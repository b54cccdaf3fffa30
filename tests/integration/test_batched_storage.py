"""A batch stored in one transaction gives what storing its webhooks one by one would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from callpipe_testing import refuse_call

from infra.settings import Settings
from schemas import codec
from schemas.events import CallFields
from schemas.topology import HEADER_KIND, HEADER_PROJECT, HEADER_RECEIVED_AT
from workers.delivery import ReceivedWebhook, decode_delivery
from workers.enrich import enrich
from workers.errors import PermanentError, TransientError
from workers.events import render_outbox
from workers.storage import PostgresCallStore, StoredBatch, create_pool

T0 = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)


def received(call_id: str, kind: str = "end", *, at: int = 0, **fields: Any) -> ReceivedWebhook:
    headers = {
        HEADER_PROJECT: "acme",
        HEADER_KIND: kind,
        HEADER_RECEIVED_AT: (T0 + timedelta(seconds=at)).isoformat(),
    }
    body = {"id": call_id, "caller": "79990001122", **fields}
    if kind == "end":
        body.setdefault("status", "ANSWER")
    return decode_delivery(codec.dumps(body), headers, kind)  # type: ignore[arg-type]


def items(*webhooks: ReceivedWebhook) -> list[tuple[ReceivedWebhook, CallFields]]:
    return [(w, enrich(w.payload, region="RU", tz=Settings().time_zone)) for w in webhooks]


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[PostgresCallStore]:
    pool = await create_pool(settings.database_url, settings.namespace, 4)
    try:
        yield PostgresCallStore(pool)
    finally:
        await pool.close()


def revisions(stored: StoredBatch) -> list[tuple[str, int]]:
    return [(e.event_id, orjson.loads(e.body)["call"]["revision"]) for e in stored.events]


async def test_a_start_and_its_end_in_one_batch_give_one_row_and_two_revisions(
    store: PostgresCallStore, db: asyncpg.Pool, settings: Settings
) -> None:
    stored = await store.record(
        items(received("c1", "start", date="2026-11-25 10:00:00"), received("c1", "end", at=60)),
        render_outbox,
    )
    assert [r.stored for r in stored.recorded] == [True, True]
    assert revisions(stored) == [("acme:c1:start", 1), ("acme:c1:end", 2)]
    ended = orjson.loads(stored.events[1].body)["call"]
    assert ended["start_received_at"] == "2026-11-25T07:00:00Z"
    assert ended["end_received_at"] == "2026-11-25T07:01:00Z"
    assert ended["called_at"] == "2026-11-25T07:00:00Z"
    row = await db.fetchrow(f'SELECT revision, status FROM "{settings.namespace}".calls')
    assert row is not None and (row["revision"], row["status"]) == (2, "ANSWER")
    stored_events = await db.fetchval(
        f'SELECT count(*) FROM "{settings.namespace}".call_events WHERE event IS NOT NULL'
    )
    assert stored_events == 2


async def test_repeat_calls_in_one_batch_see_each_other(store: PostgresCallStore) -> None:
    batch = items(
        *(received(f"r{n}", date=f"2026-11-25 10:0{n}:00") for n in range(3)),
        received("other", caller="79990009999", date="2026-11-25 10:05:00"),
    )
    stored = await store.record(batch, render_outbox)
    calls = [orjson.loads(e.body)["call"] for e in stored.events]
    assert [(c["call_id"], c["previous_calls"]) for c in calls] == [
        ("r0", 0),
        ("r1", 1),
        ("r2", 2),
        ("other", 0),
    ]
    assert [c["is_repeat_caller"] for c in calls] == [False, True, True, False]


async def test_a_webhook_twice_in_one_batch_and_again_later_is_stored_once(
    store: PostgresCallStore, db: asyncpg.Pool, settings: Settings
) -> None:
    stored = await store.record(items(received("d"), received("d"), received("e")), render_outbox)
    assert [r.stored for r in stored.recorded] == [True, False, True]
    assert [e.event_id for e in stored.events] == ["acme:d:end", "acme:e:end"]
    again = await store.record(items(received("d"), received("f")), render_outbox)
    assert [r.stored for r in again.recorded] == [False, True]
    assert [e.event_id for e in again.events] == ["acme:f:end"]
    assert await db.fetchval(f'SELECT count(*) FROM "{settings.namespace}".calls') == 3


async def test_a_failing_batch_leaves_nothing_behind(
    store: PostgresCallStore, db: asyncpg.Pool, settings: Settings
) -> None:
    await refuse_call(db, settings.namespace, "bad", message="refused", errcode="22023")
    with pytest.raises(PermanentError, match="database refused the data"):
        await store.record(items(received("ok"), received("bad")), render_outbox)
    assert await db.fetchval(f'SELECT count(*) FROM "{settings.namespace}".call_events') == 0
    assert await db.fetchval(f'SELECT count(*) FROM "{settings.namespace}".calls') == 0


async def test_an_event_stored_meanwhile_without_the_lock_fails_the_batch_as_transient(
    store: PostgresCallStore, db: asyncpg.Pool, settings: Settings
) -> None:
    """A writer that does not take the call's lock stores the event id between the lookup
    and the insert (a trigger on `calls` plays it): the batch rolls back and is retried,
    not dead-lettered; the retry sees the webhook as stored."""
    ns = settings.namespace
    await db.execute(
        f"""
        CREATE FUNCTION "{ns}".store_meanwhile() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO "{ns}".call_events (event_id, project, call_id, kind, received_at,
                payload)
            VALUES ('acme:' || NEW.call_id || ':end', 'acme', NEW.call_id, 'end', now(), '{{}}');
            RETURN NEW;
        END $$;
        CREATE TRIGGER store_meanwhile BEFORE INSERT ON "{ns}".calls
            FOR EACH ROW EXECUTE FUNCTION "{ns}".store_meanwhile();
        """
    )
    with pytest.raises(TransientError, match="stored meanwhile"):
        await store.record(items(received("raced")), render_outbox)
    assert await db.fetchval(f'SELECT count(*) FROM "{ns}".call_events') == 0
    assert await db.fetchval(f'SELECT count(*) FROM "{ns}".calls') == 0


async def test_concurrent_batches_touching_the_same_calls_in_any_order_never_deadlock(
    store: PostgresCallStore, db: asyncpg.Pool, settings: Settings
) -> None:
    """Batches share calls and callers in opposite orders; all locks are taken up front in
    one order, so every batch commits: a deadlock would fail one (`TransientError`)."""
    ids = [f"x{n}" for n in range(30)]
    callers = ["79990000001", "79990000002", "79990000003"]

    def batch(kind: str, order: list[str]) -> list[tuple[ReceivedWebhook, CallFields]]:
        return items(
            *(
                received(i, kind, caller=callers[int(i[1:]) % 3], date="2026-11-25 10:00:00")
                for i in order
            )
        )

    results = await asyncio.gather(
        store.record(batch("start", ids), render_outbox),
        store.record(batch("end", ids[::-1]), render_outbox),
        store.record(batch("start", ids[::-1]), render_outbox),
        store.record(batch("end", ids), render_outbox),
    )
    assert sum(r.stored for result in results for r in result.recorded) == 60
    rows = await db.fetch(f'SELECT revision FROM "{settings.namespace}".calls')
    assert len(rows) == 30 and {row["revision"] for row in rows} == {2}


@pytest.mark.parametrize(
    "body",
    [
        # As Roistat may send it: a byte-order mark, indentation, escaped Cyrillic, a big id.
        b'\xef\xbb\xbf{\n  "id": 12345678901234567890,\n  "city": "\\u041c\\u043e\\u0441\\u043a'
        b'\\u0432\\u0430",\n  "status": "ANSWER",\n  "custom_fields": {"a": [1, 2.5, null]}\n}\n',
        # NULs PostgreSQL cannot store: the replaced document is stored, not the body.
        b'{"id": "n1", "status": "ANSWER", "city": "a\\u0000b"}',
    ],
)
async def test_the_payload_and_the_events_raw_are_the_webhook_as_decoded(
    store: PostgresCallStore, db: asyncpg.Pool, settings: Settings, body: bytes
) -> None:
    """The body's own JSON is stored and published (not encoded again): both read back as
    the document the worker decoded."""
    headers = {HEADER_PROJECT: "acme", HEADER_KIND: "end", HEADER_RECEIVED_AT: T0.isoformat()}
    webhook = decode_delivery(body, headers, "end")
    stored = await store.record(items(webhook), render_outbox)
    assert orjson.loads(stored.events[0].body)["raw"] == webhook.document
    table = f'"{settings.namespace}".call_events'
    row = await db.fetchrow(f"SELECT payload::text, (event -> 'raw')::text AS raw FROM {table}")
    assert row is not None
    assert orjson.loads(row["payload"]) == webhook.document
    assert orjson.loads(row["raw"]) == webhook.document
