"""PostgreSQL adapter for Telegram alerts: claim one alert per call, find alerts to follow up."""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg

# An alert is 'sending' from its claim until it is settled ('sent', 'failed', 'unknown'). The
# holder of a claim names it with a `claim_id` of its own, which every later step checks; its
# `request_at` stays NULL until the request to Telegram is about to go out, so a claim left
# behind before that (the sink stopped, or the database failed and stayed away) is surely
# unsent. A row with no `claim_id` was claimed by a sink from before 0006, which may be
# sending it now: it is treated as one whose request is out.

# One statement: a new call is claimed; so is a call whose earlier attempt surely failed, and
# one whose holder stopped before its request went out, once its claim lease is over.
# Anything else (claimed within its lease, request out, sent, unknown) is left as it is.
CLAIM = """
INSERT INTO telegram_alerts AS a
    (sink, project, call_id, caller, called_at, state, claimed_at, claim_id)
VALUES ($1, $2, $3, $4, $5, 'sending', clock_timestamp(), $6)
ON CONFLICT (sink, project, call_id) DO UPDATE
SET state = 'sending', claimed_at = clock_timestamp(), claim_id = $6, request_at = NULL
WHERE a.state = 'failed'
   OR (a.state = 'sending' AND a.claim_id IS NOT NULL AND a.request_at IS NULL
       AND a.claimed_at < clock_timestamp() - $7::interval)
RETURNING claim_id
"""

# The holder is about to call Telegram: from now on the alert may arrive. Not once its claim
# lease is over: another delivery may have taken the claim over (or may do so any moment),
# and the callback the holder looked up may be stale.
START_SENDING = """
UPDATE telegram_alerts SET request_at = clock_timestamp(), claimed_at = clock_timestamp()
WHERE sink = $1 AND project = $2 AND call_id = $3 AND state = 'sending' AND claim_id = $4
  AND request_at IS NULL AND claimed_at >= clock_timestamp() - $5::interval
RETURNING claim_id
"""

# A request older than the lease belongs to a sink that stopped mid-send: whether Telegram got
# the message is unknowable, so it is never sent again.
EXPIRE_CLAIM = """
UPDATE telegram_alerts SET state = 'unknown'
WHERE sink = $1 AND project = $2 AND call_id = $3
  AND state = 'sending' AND claimed_at < clock_timestamp() - $4::interval
  AND (request_at IS NOT NULL OR claim_id IS NULL)
RETURNING state
"""

STATE = "SELECT state FROM telegram_alerts WHERE sink = $1 AND project = $2 AND call_id = $3"

# Telegram surely did not get it: a later delivery may claim it again. The claim's id goes,
# so that a sink from before 0006 claiming it again is not taken for a new one. Its holder
# knows, so a claim that another delivery has meanwhile expired as 'unknown' (its holder was
# held up past the lease, releasing it) is released too.
RELEASE = """
UPDATE telegram_alerts SET state = 'failed', claim_id = NULL, request_at = NULL
WHERE sink = $1 AND project = $2 AND call_id = $3 AND state IN ('sending', 'unknown')
  AND claim_id = $4
"""

# Telegram may have got it: never send it again.
ABANDON = """
UPDATE telegram_alerts SET state = 'unknown'
WHERE sink = $1 AND project = $2 AND call_id = $3 AND state = 'sending' AND claim_id = $4
"""

MARK_SENT = """
UPDATE telegram_alerts
SET state = 'sent', chat_id = $4, message_id = $5, alert_text = $6, sent_at = clock_timestamp(),
    followed_up_by = $7, followed_up_at = CASE WHEN $7::text IS NULL THEN NULL
                                               ELSE clock_timestamp() END
WHERE sink = $1 AND project = $2 AND call_id = $3
"""

# The caller got through before the alert went out (events arrive in any order): the
# stored call rows know, whatever order their events come in.
ANSWERED_CALLBACK = """
SELECT call_id, called_at, duration_s FROM calls
WHERE project = $1 AND caller = $2 AND outcome = 'answered'
  AND called_at > $3 AND called_at <= $3 + $4::interval
ORDER BY called_at
LIMIT 1
"""

# An alert of this caller in the window is claimed or being sent right now (it may not have
# seen the answered call): its follow-up must wait. Not for a claim older than the lease: that
# send was cut off (or sent but never noted), and waiting for it would hold the caller's
# follow-ups for good. (A claim whose request is not out yet lapses sooner, see START_SENDING.)
SENDING_IN_WINDOW = """
SELECT count(*) FROM telegram_alerts
WHERE sink = $1 AND project = $2 AND caller = $3 AND state = 'sending'
  AND called_at < $4 AND called_at >= $4 - $5::interval
  AND claimed_at >= clock_timestamp() - $6::interval
"""

# Alerts of the same caller in the window before the answered call, not yet followed up by
# another call: claimed for this one. A redelivery of the same answered call finds them again.
CLAIM_FOLLOW_UPS = """
UPDATE telegram_alerts SET followed_up_by = $4, followed_up_at = clock_timestamp()
WHERE sink = $1 AND project = $2 AND caller = $3 AND state = 'sent'
  AND called_at < $5 AND called_at >= $5 - $6::interval
  AND (followed_up_by IS NULL OR followed_up_by = $4)
RETURNING call_id, chat_id, message_id, alert_text
"""


DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# Of those, the ones that say the database is away (it will answer again), not that it
# refuses what was asked.
DATABASE_AWAY = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
)
STORE_TRIES = 3  # a write the alert's fate hangs on, ~1.5 s in all

T = TypeVar("T")


async def tried_hard(write: Callable[[], Awaitable[T]]) -> T:
    """`write`, tried up to STORE_TRIES times with a growing pause; the last error is raised.
    For the writes an alert's fate hangs on: a claim's release, the note that it was sent."""
    for attempt in range(1, STORE_TRIES):
        try:
            return await write()
        except DATABASE_ERRORS:
            await asyncio.sleep(0.5 * attempt)
    return await write()  # the last try: its error is raised


# How long the holder of a claim may take from its claim to its request (a callback lookup,
# a little more than the pool's command timeout): a claim older than that cannot send any
# more, and is taken over by the next delivery.
CLAIM_LEASE = timedelta(seconds=45)


class Claim(enum.Enum):
    """Why an alert was not claimed."""

    SETTLED = "settled"  # sent already, or abandoned as unknown: nothing to send
    BUSY = "busy"  # another delivery is sending it right now
    CUT_OFF = "cut-off"  # an attempt stopped mid-send: it may or may not have arrived


@dataclass(frozen=True)
class AlertKey:
    sink: str
    project: str
    call_id: str


@dataclass(frozen=True)
class Held:
    """This delivery's claim on an alert."""

    key: AlertKey
    claim_id: uuid.UUID


@dataclass(frozen=True)
class OpenAlert:
    call_id: str
    chat_id: str
    message_id: int
    text: str


class AlertStore:
    def __init__(
        self, pool: asyncpg.Pool, lease: timedelta, claim_lease: timedelta = CLAIM_LEASE
    ) -> None:
        self._pool = pool
        self._lease = lease  # of a send
        self._claim_lease = claim_lease

    async def claim(
        self, key: AlertKey, caller: str | None, called_at: datetime | None
    ) -> Held | Claim:
        async with self._pool.acquire() as conn:
            args = (key.sink, key.project, key.call_id)
            held = Held(key, uuid.uuid4())
            claimed = await conn.fetchval(
                CLAIM, *args, caller, called_at, held.claim_id, self._claim_lease
            )
            if claimed is not None:
                return held
            if await conn.fetchval(EXPIRE_CLAIM, *args, self._lease) is not None:
                return Claim.CUT_OFF
            state = await conn.fetchval(STATE, *args)
        return Claim.BUSY if state == "sending" else Claim.SETTLED

    async def start_sending(self, held: Held) -> bool:
        """Note that the request is about to go out; False if the claim lapsed meanwhile."""
        key = held.key
        async with self._pool.acquire() as conn:
            noted = await conn.fetchval(
                START_SENDING, key.sink, key.project, key.call_id, held.claim_id, self._claim_lease
            )
        return noted is not None

    async def mark_sent(
        self,
        key: AlertKey,
        chat_id: str,
        message_id: int,
        text: str,
        followed_up_by: str | None = None,
    ) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                MARK_SENT,
                key.sink,
                key.project,
                key.call_id,
                chat_id,
                message_id,
                text,
                followed_up_by,
            )

    async def answered_callback(
        self, project: str, caller: str, missed_at: datetime, window: timedelta
    ) -> dict[str, Any] | None:
        """The caller's first answered call within `window` after the missed one, if stored."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(ANSWERED_CALLBACK, project, caller, missed_at, window)
        if row is None:
            return None
        return {
            "call_id": row["call_id"],
            "called_at": row["called_at"].isoformat(),
            "duration_s": row["duration_s"],
        }

    async def alert_being_sent(
        self, sink: str, project: str, caller: str, answered_at: datetime, window: timedelta
    ) -> bool:
        async with self._pool.acquire() as conn:
            count = await conn.fetchval(
                SENDING_IN_WINDOW, sink, project, caller, answered_at, window, self._lease
            )
        return bool(count)

    async def release(self, held: Held) -> bool:
        """Telegram surely did not get it: a later delivery may claim it again. False if the
        claim was no longer this delivery's."""
        return await self._settle(RELEASE, held)

    async def abandon(self, held: Held) -> None:
        """Telegram may have got it: never send it again."""
        await self._settle(ABANDON, held)

    async def _settle(self, statement: str, held: Held) -> bool:
        key = held.key
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                statement, key.sink, key.project, key.call_id, held.claim_id
            )
        return status != "UPDATE 0"

    async def claim_follow_ups(
        self,
        sink: str,
        project: str,
        caller: str,
        answered_call_id: str,
        answered_at: datetime,
        window: timedelta,
    ) -> list[OpenAlert]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                CLAIM_FOLLOW_UPS, sink, project, caller, answered_call_id, answered_at, window
            )
        return [
            OpenAlert(row["call_id"], row["chat_id"], row["message_id"], row["alert_text"])
            for row in rows
        ]
