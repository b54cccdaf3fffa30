"""How far `worker end` has got, read off its queue: the stale sweep's gate (workers/stale.py).

A call start only looks stale once every call end that came before has been stored. While
call ends wait in `{ns}.call-end` (a `worker end` down, or behind), or no `worker end`
consumes it, a start's end may be among them: the sweep waits instead of marking the call.
The broker counts only the ends waiting, not those a worker holds: an end held for longer
than a sweep interval (retried through a long database outage) is not waited for.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection

# A broker that does not answer the look within this is treated as "cannot tell": wait.
LOOK_TIMEOUT_S = 5.0


class CallEndQueue:
    def __init__(self, connection: AbstractConnection, queue: str) -> None:
        self._connection = connection
        self._queue = queue

    async def why_wait(self) -> str | None:
        """Why call ends may still be on their way; None when `worker end` is caught up."""
        try:
            async with asyncio.timeout(LOOK_TIMEOUT_S):
                # A channel of its own: a passive declare of a missing queue closes it.
                async with self._connection.channel() as channel:
                    queue = await channel.declare_queue(self._queue, passive=True)
        except Exception as exc:  # a broker away or reconnecting: cannot tell, so wait
            return f"cannot read {self._queue}: {type(exc).__name__}"
        declared = queue.declaration_result
        if declared.consumer_count == 0:
            return f"no worker end consumes {self._queue}"
        if declared.message_count:
            return f"{declared.message_count} call ends wait in {self._queue}"
        return None
