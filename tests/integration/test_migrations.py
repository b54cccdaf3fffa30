"""Migrations on a database that already holds calls (0002 keeps them and fills `revision`),
and what later ones set."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest
from conftest import Services

from schemas.topology import HEADER_KIND, HEADER_PROJECT, HEADER_RECEIVED_AT
from workers.delivery import decode_delivery
from workers.enrich import enrich
from workers.events import render_outbox
from workers.migrate import MIGRATIONS_DIR, Connection, drop_schema, migrate
from workers.storage import PostgresCallStore, create_pool

REVISION_MIGRATION = "0002_call_revision_and_roistat_params"
AT = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)

INSERT_CALL = """
INSERT INTO calls (project, call_id, caller, status, start_received_at, end_received_at)
VALUES ('acme', $1, '+79990009911', $2, $3, $4)
"""
INSERT_EVENT = """
INSERT INTO call_events (event_id, project, call_id, kind, received_at, payload, published_at)
VALUES ('acme:' || $1 || ':' || $2, 'acme', $1, $2, $3, $4, $3)
"""


@contextlib.asynccontextmanager
async def schema_at(db: asyncpg.Pool, last: str) -> AsyncIterator[str]:
    """A namespace migrated by hand up to the migration `last` only, as an installation of
    that version; dropped after."""
    name = f"cpt_{uuid.uuid4().hex[:12]}"
    files = [path for path in sorted(MIGRATIONS_DIR.glob("*.sql")) if path.stem <= last]
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(f'CREATE SCHEMA "{name}"')
        await conn.execute(f'SET LOCAL search_path TO "{name}"')
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in files:
            await conn.execute(path.read_text(encoding="utf-8"))
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
    try:
        yield name
    finally:
        async with db.acquire() as conn:
            await drop_schema(conn, name)


@pytest.fixture
async def schema_at_0001(db: asyncpg.Pool) -> AsyncIterator[str]:
    """A namespace at 0001 only, as an installation of the first version."""
    async with schema_at(db, "0001_initial") as name:
        yield name


async def _insert_call(conn: Connection, call_id: str, halves: dict[str, dict[str, Any]]) -> None:
    """A call as version 1 stored it: the row, and each half's payload as received."""
    status = halves.get("end", {}).get("status")
    start_at = AT if "start" in halves else None
    end_at = AT if "end" in halves else None
    await conn.execute(INSERT_CALL, call_id, status, start_at, end_at)
    for kind, payload in halves.items():
        await conn.execute(INSERT_EVENT, call_id, kind, AT, orjson.dumps(payload).decode())


async def test_0002_keeps_existing_calls_and_sets_revision_and_new_columns(
    db: asyncpg.Pool, schema_at_0001: str
) -> None:
    async with db.acquire() as conn:
        await conn.execute(f'SET search_path TO "{schema_at_0001}"')
        await _insert_call(
            conn,
            "both",
            {
                "start": {
                    "id": "both",
                    "first_visit": "2026-11-20 09:15:00",
                    "roistat_param_1": "s1",
                    "roistat_param_2": "s2",
                    "roistat_param_3": 42,
                },
                "end": {
                    "id": "both",
                    "status": "ANSWER",
                    "roistat_param_1": " ",
                    "roistat_param_2": "e2",
                    "roistat_param_5": "e5",
                },
            },
        )
        await _insert_call(conn, "start-only", {"start": {"id": "start-only"}})
        await _insert_call(conn, "end-only", {"end": {"id": "end-only", "roistat_param_4": "e4"}})
        await conn.execute("RESET search_path")
        before = await conn.fetch(
            f'SELECT call_id, caller, status, updated_at FROM "{schema_at_0001}".calls'
            " ORDER BY call_id"
        )

        applied = await migrate(conn, schema_at_0001)
        assert applied[0] == REVISION_MIGRATION
        rows = await conn.fetch(f'SELECT * FROM "{schema_at_0001}".calls ORDER BY call_id')

    assert [(r["call_id"], r["caller"], r["status"], r["updated_at"]) for r in rows] == [
        tuple(r) for r in before
    ]
    by_id = {r["call_id"]: r for r in rows}
    assert {call_id: r["revision"] for call_id, r in by_id.items()} == {
        "both": 2,
        "end-only": 1,
        "start-only": 1,
    }
    new_columns = ["first_visit", *(f"roistat_param_{n}" for n in range(1, 6))]
    # Merged as the workers merge: the end's non-empty value wins; an empty one erases nothing.
    assert [by_id["both"][c] for c in new_columns] == [
        "2026-11-20 09:15:00",
        "s1",
        "e2",
        "42",
        None,
        "e5",
    ]
    assert [by_id["end-only"][c] for c in new_columns] == [None, None, None, None, "e4", None]
    assert [by_id["start-only"][c] for c in new_columns] == [None] * 6


async def test_a_call_started_before_0002_ends_after_it_with_revision_2(
    services: Services, db: asyncpg.Pool, schema_at_0001: str
) -> None:
    async with db.acquire() as conn:
        await conn.execute(f'SET search_path TO "{schema_at_0001}"')
        await _insert_call(conn, "old", {"start": {"id": "old", "roistat_param_1": "s1"}})
        await conn.execute("RESET search_path")
        await migrate(conn, schema_at_0001)

    headers = {
        HEADER_PROJECT: "acme",
        HEADER_KIND: "end",
        HEADER_RECEIVED_AT: "2026-11-25T07:05:00+00:00",
    }
    body = orjson.dumps({"id": "old", "status": "ANSWER", "duration": 12})
    received = decode_delivery(body, headers, "end")
    call = enrich(received.payload, region="RU", tz=ZoneInfo("Europe/Moscow"))
    pool = await create_pool(services.database_url, schema_at_0001, 2)
    try:
        stored = await PostgresCallStore(pool).record([(received, call)], render_outbox)
    finally:
        await pool.close()

    assert stored.recorded[0].stored
    [outbox] = stored.events
    event = orjson.loads(outbox.body)
    assert event["call"]["revision"] == 2
    assert (event["call"]["caller"], event["call"]["status"]) == ("+79990009911", "ANSWER")
    assert event["call"]["roistat_param_1"] == "s1"
    assert event["call"]["start_received_at"] == "2026-11-25T07:00:00Z"
    assert event["call"]["end_received_at"] == "2026-11-25T07:05:00Z"


async def test_call_events_compress_the_webhook_and_its_event_with_lz4_where_it_exists(
    db: asyncpg.Pool, namespace: str
) -> None:
    """0005: lz4 on the two wide columns (a server built without lz4 keeps its default)."""
    has_lz4 = await db.fetchval(
        "SELECT count(*) = 1 FROM pg_config() WHERE name = 'CONFIGURE' AND setting LIKE '%lz4%'"
    )
    compression = await db.fetch(
        "SELECT attname, attcompression::text FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attname IN ('payload', 'event') ORDER BY attname",
        f'"{namespace}".call_events',
    )
    expected = "l" if has_lz4 else ""
    assert [(row["attname"], row["attcompression"]) for row in compression] == [
        ("event", expected),
        ("payload", expected),
    ]


async def test_0006_gives_up_behind_a_long_reader_and_applies_once_it_is_gone(
    db: asyncpg.Pool,
) -> None:
    """A BI query holding `telegram_alerts` open: 0006 gives up after its lock timeout (the
    migration is retried) instead of queueing every sink behind the query."""
    async with (
        schema_at(db, "0005_call_events_lz4") as name,
        db.acquire() as reader,
        db.acquire() as migrator,
    ):
        reading = reader.transaction()
        await reading.start()
        try:
            await reader.execute(f'SELECT count(*) FROM "{name}".telegram_alerts')
            with pytest.raises(asyncpg.LockNotAvailableError):
                await migrate(migrator, name)
        finally:
            await reading.rollback()
        assert await migrate(migrator, name) == ["0006_telegram_alerts_claimed"]
        columns = await migrator.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = 'telegram_alerts'"
            " AND column_name IN ('claim_id', 'request_at') ORDER BY column_name",
            name,
        )
        assert [row["column_name"] for row in columns] == ["claim_id", "request_at"]
