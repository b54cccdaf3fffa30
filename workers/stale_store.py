"""PostgreSQL side of the stale sweep: mark a call start left without its end, once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas.events import CallEvent, CallFields
from schemas.topology import stale_event_id
from workers.errors import TransientError
from workers.failpoints import failpoint
from workers.storage import (
    CLAIM_EVENT,
    RETURNED_COLUMNS,
    SET_EVENT_PUBLISHED,
    EventSender,
    PostgresCallStore,
)

# The same predicate as the partial index `calls_awaiting_end` (0004), so the sweep reads only
# the calls still waiting for their end. Many workers sweep at once: each takes the rows no one
# else holds, and a call end being merged holds its row, so it is never marked meanwhile.
LOCK_DUE = """
SELECT c.project, c.call_id, e.payload
FROM calls AS c
LEFT JOIN call_events AS e ON e.event_id = c.project || ':' || c.call_id || ':start'
WHERE c.end_received_at IS NULL AND c.stale_at IS NULL
  AND c.start_received_at < now() - make_interval(mins => $1::int)
ORDER BY c.start_received_at
LIMIT $2
FOR UPDATE OF c SKIP LOCKED
"""

MARK_STALE = f"""
UPDATE calls SET stale_at = clock_timestamp(), updated_at = now()
WHERE project = $1 AND call_id = $2 AND stale_at IS NULL AND end_received_at IS NULL
RETURNING {", ".join(RETURNED_COLUMNS)}
"""

StaleRenderer = Callable[[str, CallFields, dict[str, Any]], CallEvent]


class PostgresStaleStore(PostgresCallStore):
    """The calls store's pool and error mapping, with the sweep's SQL."""

    async def mark_stale(
        self, after_min: int, limit: int, render: StaleRenderer, send: EventSender
    ) -> int:
        """Mark up to `limit` due calls stale and publish each one's event; the number marked.

        One transaction for the batch, committed after the confirms. Each call has its own
        savepoint: a call that fails is left for the next sweep, and the calls confirmed are
        committed (no second event for them) before the first error is raised. A failed
        publish ends the batch (the broker is in trouble); any other error skips that call
        only, so one call that cannot be marked holds back no other.
        """
        marked = 0
        failure: Exception | None = None
        async with self._transaction() as conn:
            for due in await conn.fetch(LOCK_DUE, after_min, limit):
                project, call_id = due["project"], due["call_id"]
                try:
                    async with conn.transaction():
                        row = await conn.fetchrow(MARK_STALE, project, call_id)
                        if row is None:  # cannot happen while we hold the row; harmless
                            continue
                        call = CallFields.model_validate(dict(row))
                        event_id = stale_event_id(project, call_id)
                        raw = due["payload"] if isinstance(due["payload"], dict) else {}
                        claimed = await conn.fetchval(
                            CLAIM_EVENT, event_id, project, call_id, "stale", call.stale_at, raw
                        )
                        if claimed is None:  # its event exists already (a hand-reset stale_at)
                            continue
                        event = render(project, call, raw).to_json_dict()
                        await send(event)
                        failpoint("stale.after_confirm", event_id)
                        await conn.execute(SET_EVENT_PUBLISHED, event_id, event)
                except TransientError as exc:
                    failure = failure or exc
                    break
                except Exception as exc:
                    failure = failure or exc
                    continue
                marked += 1
        if failure is not None:
            raise failure
        return marked
