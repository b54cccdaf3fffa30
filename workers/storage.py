"""PostgreSQL adapter: claim a webhook once, merge its call row, publish its event once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from schemas import codec
from schemas.events import CallFields
from workers.batch import call_key, caller_key, first_of_each, lock_ids, rounds
from workers.delivery import ReceivedWebhook
from workers.errors import PermanentError, TransientError
from workers.events import OutboxEvent, Row
from workers.failpoints import failpoint

# Columns merged per the rule: a non-empty value from the call end wins over the call
# start; otherwise the first non-empty value stays. Order independent by construction.
MERGED_COLUMNS: dict[str, str] = {
    "caller": "text",
    "callee": "text",
    "called_at": "timestamptz",
    "status": "text",
    "outcome": "text",
    "duration_s": "integer",
    "is_missed": "boolean",
    "recording_url": "text",
    "file_id": "text",
    "visit_id": "text",
    "order_id": "text",
    "marker": "text",
    "source_level_1": "text",
    "source_level_2": "text",
    "utm_source": "text",
    "utm_medium": "text",
    "utm_campaign": "text",
    "utm_term": "text",
    "utm_content": "text",
    "roistat_param_1": "text",
    "roistat_param_2": "text",
    "roistat_param_3": "text",
    "roistat_param_4": "text",
    "roistat_param_5": "text",
    "landing_page": "text",
    "domain": "text",
    "referrer": "text",
    "first_visit": "text",
    "city": "text",
    "country": "text",
    "ip": "text",
    "google_client_id": "text",
    "metrika_client_id": "text",
    "custom_fields": "jsonb",
    "caller_region": "text",
    "caller_carrier": "text",
}

# The merged row as the event carries it (`CallFields`): every public column but the
# project (in the envelope) and `updated_at`.
RETURNED_COLUMNS: tuple[str, ...] = (
    "call_id",
    *MERGED_COLUMNS,
    "is_repeat_caller",
    "previous_calls",
    "revision",
    "start_received_at",
    "end_received_at",
    "stale_at",
)

REPEAT_WINDOW = "30 days"

# A batch travels as one JSON array of rows (one parameter, encoded once), read back into
# typed columns by `json_to_recordset`: as `json`, not `jsonb`, PostgreSQL reads the text once
# without building a document first (a tenth less of its CPU for the merge). Column arrays
# cost it less still, but cost the worker more to encode than they save.
_CALL_ROW_TYPES = {"project": "text", "call_id": "text", "received_at": "timestamptz"}
_CALL_ROW_TYPES.update(MERGED_COLUMNS)


def _upsert_calls_sql() -> str:
    names = list(MERGED_COLUMNS)
    columns = ", ".join(f"{name} {kind}" for name, kind in _CALL_ROW_TYPES.items())
    # Only a call end sets `end_received_at`, so the conflict clause can tell which half came.
    is_end = "EXCLUDED.end_received_at IS NOT NULL"
    merges = ",\n    ".join(
        f"{name} = CASE WHEN {is_end} THEN COALESCE(EXCLUDED.{name}, c.{name})"
        f" ELSE COALESCE(c.{name}, EXCLUDED.{name}) END"
        for name in names
    )
    return f"""
INSERT INTO calls AS c (project, call_id, {", ".join(names)},
    start_received_at, end_received_at, previous_calls, is_repeat_caller)
SELECT v.project, v.call_id, {", ".join(f"v.{name}" for name in names)},
    CASE WHEN v.kind = 'start' THEN v.received_at END,
    CASE WHEN v.kind = 'end' THEN v.received_at END,
    earlier.n, earlier.n > 0
FROM json_to_recordset($1::json) AS v(kind text, {columns})
CROSS JOIN LATERAL (
    SELECT count(*)::int AS n FROM calls e
    WHERE e.project = v.project AND e.caller = v.caller AND e.call_id <> v.call_id
      AND e.called_at >= v.called_at - interval '{REPEAT_WINDOW}' AND e.called_at < v.called_at
) AS earlier
ORDER BY v.project, v.call_id
ON CONFLICT (project, call_id) DO UPDATE SET
    {merges},
    -- Counted once, when the row first knows its caller and time (whichever half brings them).
    previous_calls = CASE WHEN c.caller IS NULL OR c.called_at IS NULL
        THEN EXCLUDED.previous_calls ELSE c.previous_calls END,
    is_repeat_caller = CASE WHEN c.caller IS NULL OR c.called_at IS NULL
        THEN EXCLUDED.is_repeat_caller ELSE c.is_repeat_caller END,
    start_received_at = COALESCE(c.start_received_at, EXCLUDED.start_received_at),
    end_received_at = COALESCE(c.end_received_at, EXCLUDED.end_received_at),
    -- Each webhook's event id is claimed once, so a call is updated at most once: revision 2.
    revision = c.revision + 1,
    updated_at = now()
RETURNING project, {", ".join(RETURNED_COLUMNS)}
"""


UPSERT_CALLS = _upsert_calls_sql()


def begin_and_lock_sql(ids: Sequence[int]) -> str:
    """One round trip that opens a batch's transaction and takes the advisory locks of every
    call and caller of the batch, in the one order all workers lock in (workers/batch.py). The
    ids are integers computed here, written into the text as numbers: a query of two
    statements cannot take parameters."""
    array = ",".join(str(int(lock)) for lock in ids)
    return f"BEGIN; SELECT pg_advisory_xact_lock(k) FROM unnest('{{{array}}}'::bigint[]) AS k"


# Which of a batch's webhooks are stored already (duplicates, redeliveries). Read under the
# advisory lock of each webhook's call, which every writer of a webhook's event id holds, so
# no other transaction can store one of them before this one's insert.
STORED_EVENT_IDS = """
SELECT event_id FROM call_events WHERE event_id = ANY($1::text[])
"""

# The new webhooks with their events, in one insert: each row is written once, with the event
# the relay will publish (an update of the row for the event cost more than all the rest).
# Column arrays of JSON bytes, not one jsonb document of rows: PostgreSQL then parses each
# payload and event once, straight into its column. That took 40% off its CPU for this insert,
# the costliest (arrays of jsonb took only 10%: their binary input costs it more); as bytea
# the JSON goes as it is, with no text round trip in the worker.
INSERT_EVENTS = """
INSERT INTO call_events (event_id, project, call_id, kind, received_at, payload, event)
SELECT v.event_id, v.project, v.call_id, v.kind, v.received_at,
    convert_from(v.payload, 'UTF8')::jsonb, convert_from(v.event, 'UTF8')::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::bytea[], $7::bytea[])
    AS v(event_id, project, call_id, kind, received_at, payload, event)
ORDER BY v.event_id
"""

# One webhook at a time (the stale sweep).
CLAIM_EVENT = """
INSERT INTO call_events (event_id, project, call_id, kind, received_at, payload)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

SET_EVENT_PUBLISHED = """
UPDATE call_events SET event = $2, published_at = clock_timestamp() WHERE event_id = $1
"""

EventSender = Callable[[dict[str, Any]], Awaitable[None]]
# The event of a webhook from its merged row (RETURNED_COLUMNS, typed by PostgreSQL).
EventRenderer = Callable[[ReceivedWebhook, Row], OutboxEvent]


@dataclass(frozen=True)
class Recorded:
    stored: bool  # False: a duplicate or a redelivery of a stored webhook


@dataclass(frozen=True)
class StoredBatch:
    recorded: list[Recorded]  # one per webhook, in order
    events: list[OutboxEvent]  # the events committed with it, to publish


class CallStore(Protocol):
    """The storage port the pipeline needs."""

    async def record(
        self, items: Sequence[tuple[ReceivedWebhook, CallFields]], render: EventRenderer
    ) -> StoredBatch: ...


# Trouble that passes: lost connections, failover, restarts, full disks, rotated passwords,
# serialization conflicts, and a schema not (yet, or no longer) migrated. Retrying holds the
# message; giving up would dead-letter healthy webhooks.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.TransactionRollbackError,
    asyncpg.UndefinedTableError,
)

# What the outbox relay survives: anything the database says; it tries again later.
DATABASE_TROUBLE = (*_TRANSIENT, asyncpg.PostgresError)


# jsonb's binary form is a version byte, then the JSON text: orjson's bytes go as they are,
# with no text round trip on either side.
_JSONB_VERSION = b"\x01"


def _encode_jsonb(value: Any) -> bytes:
    return _JSONB_VERSION + codec.dumps(value)


def _decode_jsonb(data: bytes) -> Any:
    return codec.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


async def reset_session(conn: asyncpg.Connection) -> None:
    """Roll back a connection that comes back still in a transaction; else send nothing.

    asyncpg's default reset (RESET ALL, UNLISTEN *, ...) costs a round trip per release, twice
    per message, for nothing here: locks are transaction-scoped, no LISTEN, no SET. Whether a
    transaction is open is the connection's own state: asking costs no round trip. (asyncpg
    0.30-0.32 also roll back before calling this, in a private step we do not rely on.)
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(database_url: str, namespace: str, max_size: int) -> asyncpg.Pool:
    """A lazy pool: no connection is opened until one is needed, so start-up never fails."""
    return await asyncpg.create_pool(
        database_url,
        min_size=0,
        max_size=max_size,
        init=_init_connection,
        reset=reset_session,
        server_settings={
            "search_path": f'"{namespace}"',
            "application_name": "callpipe-worker",
            # Plan each statement for the tables as they are now. A generic plan made while
            # `calls` was empty counts repeat callers by scanning the project's calls, not
            # the caller's index, and gets slower with every row until the table is analyzed.
            "plan_cache_mode": "force_custom_plan",
        },
        command_timeout=30,
    )


class PostgresCallStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(
        self, items: Sequence[tuple[ReceivedWebhook, CallFields]], render: EventRenderer
    ) -> StoredBatch:
        """Store a batch of webhooks in one transaction, each once, with its event.

        Under the advisory locks of their calls and callers, the webhooks whose event id is
        not stored yet merge their call rows (in rounds, see workers/batch.py), and are stored
        in `call_events` with their events, rendered from the merged rows, in the same
        transaction: the outbox. Nothing waits for the broker here; the relay publishes the
        events after the commit. A failure rolls the whole batch back, and the redelivery
        starts over.
        """
        webhooks = [webhook for webhook, _ in items]
        keys = [_keys(webhook, call) for webhook, call in items]
        firsts = first_of_each([webhook.event_id for webhook in webhooks])
        async with self._locked_transaction(lock_ids([keys[i] for i in firsts])) as conn:
            known = {
                row["event_id"]
                for row in await conn.fetch(
                    STORED_EVENT_IDS, [webhooks[i].event_id for i in firsts]
                )
            }
            new = [i for i in firsts if webhooks[i].event_id not in known]
            rendered: dict[int, OutboxEvent] = {}
            for round_ in rounds([keys[i] for i in new]):
                batch = [(new[j], *items[new[j]]) for j in round_]
                merged = {
                    (row["project"], row["call_id"]): row
                    for row in await conn.fetch(UPSERT_CALLS, _call_rows(batch))
                }
                for index, webhook, _ in batch:
                    row = merged[(webhook.project, webhook.call_id)]
                    # The event is the whole truth: the merged row, not only this webhook's part.
                    rendered[index] = render(webhook, row)
            order = sorted(rendered)  # arrival order
            events = [rendered[index] for index in order]
            if events:
                await _insert_events(conn, [(webhooks[index], rendered[index]) for index in order])
                failpoint("store.before_commit", ",".join(event.event_id for event in events))
        stored = set(new)
        return StoredBatch([Recorded(stored=i in stored) for i in range(len(webhooks))], events)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        with _database_errors():
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn

    @asynccontextmanager
    async def _locked_transaction(
        self, ids: Sequence[int]
    ) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A transaction that holds the advisory locks `ids`, opened in one round trip
        (`begin_and_lock_sql`); committed when the block ends, else rolled back."""
        with _database_errors():
            async with self._pool.acquire() as conn:
                try:
                    await conn.execute(begin_and_lock_sql(ids))
                    yield conn
                except BaseException:
                    if conn.is_in_transaction():
                        # A broken connection cannot roll back: the pool's reset then drops it.
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """PostgreSQL's errors as the consume loop's: transient ones retried, refused data not."""
    try:
        yield
    except _TRANSIENT as exc:
        raise TransientError(f"database: {type(exc).__name__}: {exc}") from exc
    except asyncpg.DataError as exc:
        # Not the message text: asyncpg quotes the offending value, which may be personal.
        raise PermanentError(
            f"database refused the data: {type(exc).__name__} ({exc.sqlstate})"
        ) from exc


def _keys(webhook: ReceivedWebhook, call: CallFields) -> list[str]:
    keys = [call_key(webhook.project, webhook.call_id)]
    if call.caller is not None:
        # Calls from one number are counted one at a time, so that two of them arriving
        # together still see each other in `previous_calls`.
        keys.append(caller_key(webhook.project, call.caller))
    return keys


async def _insert_events(
    conn: asyncpg.pool.PoolConnectionProxy, stored: Sequence[tuple[ReceivedWebhook, OutboxEvent]]
) -> None:
    try:
        await conn.execute(
            INSERT_EVENTS,
            [webhook.event_id for webhook, _ in stored],
            [webhook.project for webhook, _ in stored],
            [webhook.call_id for webhook, _ in stored],
            [webhook.kind for webhook, _ in stored],
            [webhook.received_at for webhook, _ in stored],
            [webhook.document_json for webhook, _ in stored],  # the body as received
            [event.body for _, event in stored],  # as the relay publishes it
        )
    except asyncpg.UniqueViolationError as exc:
        # Stored meanwhile by a writer that did not hold the call's lock: the retry sees it
        # as stored.
        raise TransientError(f"an event of the batch was stored meanwhile: {exc}") from exc


def _call_rows(batch: Sequence[tuple[int, ReceivedWebhook, CallFields]]) -> str:
    """The batch's call rows as one JSON array, for `json_to_recordset`."""
    return codec.dumps([_call_row(webhook, call) for _, webhook, call in batch]).decode()


def _call_row(webhook: ReceivedWebhook, call: CallFields) -> dict[str, Any]:
    # Every field of the model, a copy of its own: `json_to_recordset` reads the columns it
    # names (_CALL_ROW_TYPES) and skips the rest, which costs less than picking them here.
    row = dict(call.__dict__)
    row.update(project=webhook.project, call_id=webhook.call_id, kind=webhook.kind)
    row["received_at"] = webhook.received_at
    return row
