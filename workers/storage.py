"""PostgreSQL adapter: claim a webhook once, merge its call row, publish its event once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from schemas import codec
from schemas.events import CallEvent, CallFields
from workers.delivery import ReceivedWebhook
from workers.errors import PermanentError, TransientError
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


def _upsert_calls_sql() -> str:
    names = list(MERGED_COLUMNS)
    # $1 project, $2 call_id, $3 is_end, $4 received_at, then the merged columns.
    values = [f"${i}::{MERGED_COLUMNS[name]}" for i, name in enumerate(names, start=5)]
    caller, called_at = values[names.index("caller")], values[names.index("called_at")]
    merges = ",\n    ".join(
        f"{name} = CASE WHEN $3 THEN COALESCE(EXCLUDED.{name}, c.{name})"
        f" ELSE COALESCE(c.{name}, EXCLUDED.{name}) END"
        for name in names
    )
    return f"""
INSERT INTO calls AS c (project, call_id, {", ".join(names)},
    start_received_at, end_received_at, previous_calls, is_repeat_caller)
SELECT $1::text, $2::text, {", ".join(values)},
    CASE WHEN $3 THEN NULL ELSE $4::timestamptz END,
    CASE WHEN $3 THEN $4::timestamptz END,
    earlier.n, earlier.n > 0
FROM (
    SELECT count(*)::int AS n FROM calls e
    WHERE e.project = $1 AND e.caller = {caller} AND e.call_id <> $2
      AND e.called_at >= {called_at} - interval '{REPEAT_WINDOW}' AND e.called_at < {called_at}
) AS earlier
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
RETURNING {", ".join(RETURNED_COLUMNS)}
"""


UPSERT_CALLS = _upsert_calls_sql()

CLAIM_EVENT = """
INSERT INTO call_events (event_id, project, call_id, kind, received_at, payload)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

LOCK_CALLER = "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))"

SET_EVENT_PUBLISHED = """
UPDATE call_events SET event = $2, published_at = clock_timestamp() WHERE event_id = $1
"""

LOCK_UNPUBLISHED = """
SELECT event FROM call_events
WHERE event_id = $1 AND published_at IS NULL AND event IS NOT NULL
FOR UPDATE
"""

MARK_PUBLISHED = "UPDATE call_events SET published_at = clock_timestamp() WHERE event_id = $1"

EventRenderer = Callable[[CallFields], CallEvent]
EventSender = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Recorded:
    stored: bool  # False: a duplicate or a redelivery of a stored webhook
    published: bool  # False: its event had been published before


class CallStore(Protocol):
    """The storage port the pipeline needs."""

    async def record(
        self,
        webhook: ReceivedWebhook,
        call: CallFields,
        render: EventRenderer,
        send: EventSender,
    ) -> Recorded: ...


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


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: codec.dumps(value).decode(),
        decoder=codec.loads,
        schema="pg_catalog",
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
        server_settings={"search_path": f'"{namespace}"', "application_name": "callpipe-worker"},
        command_timeout=30,
    )


class PostgresCallStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(
        self,
        webhook: ReceivedWebhook,
        call: CallFields,
        render: EventRenderer,
        send: EventSender,
    ) -> Recorded:
        """Store the webhook once and publish its event once.

        A first delivery claims the event id, merges the call row and publishes the event in
        one transaction: the commit comes after the broker's confirm, so a failure anywhere
        leaves nothing behind and the redelivery starts over. A duplicate or a redelivery
        finds the id claimed and publishes the event only if it is still unpublished.
        """
        async with self._transaction() as conn:
            if call.caller is not None:
                # Calls from one number are counted one at a time, so that two of them arriving
                # together still see each other in `previous_calls`.
                await conn.execute(LOCK_CALLER, webhook.project, call.caller)
            claimed = await conn.fetchval(
                CLAIM_EVENT,
                webhook.event_id,
                webhook.project,
                webhook.call_id,
                webhook.kind,
                webhook.received_at,
                webhook.document,
            )
            if claimed is not None:
                row = await conn.fetchrow(
                    UPSERT_CALLS,
                    webhook.project,
                    webhook.call_id,
                    webhook.kind == "end",
                    webhook.received_at,
                    *(getattr(call, name) for name in MERGED_COLUMNS),
                )
                assert row is not None
                # The event is the whole truth: the merged row, not only this webhook's part.
                merged = CallFields.model_validate(dict(row))
                event = render(merged).to_json_dict()
                # The claimed row is this transaction's until commit: nobody else publishes it.
                await send(event)
                failpoint("store.after_confirm", webhook.event_id)
                await conn.execute(SET_EVENT_PUBLISHED, webhook.event_id, event)
                failpoint("store.before_commit", webhook.event_id)
                return Recorded(stored=True, published=True)
        published = await self._publish_pending(webhook.event_id, send)
        return Recorded(stored=False, published=published)

    async def _publish_pending(self, event_id: str, send: EventSender) -> bool:
        """A stored event not yet published (stored by an older version, or by hand) is sent
        now, holding its row lock so that concurrent redeliveries send it once."""
        async with self._transaction() as conn:
            event = await conn.fetchval(LOCK_UNPUBLISHED, event_id)
            if event is None:
                return False
            await send(event)
            await conn.execute(MARK_PUBLISHED, event_id)
            return True

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn
        except _TRANSIENT as exc:
            raise TransientError(f"database: {type(exc).__name__}: {exc}") from exc
        except asyncpg.DataError as exc:
            # Not the message text: asyncpg quotes the offending value, which may be personal.
            raise PermanentError(
                f"database refused the data: {type(exc).__name__} ({exc.sqlstate})"
            ) from exc
