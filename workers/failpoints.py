"""Crash points for the fault suite (tests/faults): off unless CALLPIPE_FAILPOINT names one.

`CALLPIPE_FAILPOINT=name[:after_n]`, read once at start: the process SIGKILLs itself the
(after_n + 1)-th time it reaches the point `name` (after_n defaults to 0). No cleanup runs,
as in a power cut of the worker alone; the broker and the database see a dead peer.

Points: `store.before_commit` (a batch's rows and events written, not committed),
`consumer.before_ack` (committed, the deliveries not acked), `outbox.after_confirm` (events
confirmed by the broker, not yet marked published), `stale.after_confirm`. The line written
before the kill names the event ids concerned, separated by commas.
"""

from __future__ import annotations

import os
import signal

ENV = "CALLPIPE_FAILPOINT"


def parse(spec: str) -> tuple[str, int] | None:
    """`name[:after_n]` → (name, after_n); empty → None. Pure."""
    name, _, after = spec.strip().partition(":")
    if not name:
        return None
    return name, int(after or 0)


class _Armed:
    point = parse(os.environ.get(ENV, ""))
    hits = 0


def failpoint(name: str, detail: str = "") -> None:
    """Kill this process here, without cleanup, if the fault suite armed the point `name`."""
    if _Armed.point is None or _Armed.point[0] != name:
        return
    _Armed.hits += 1
    if _Armed.hits > _Armed.point[1]:
        os.write(2, f"failpoint {name}: killing process {os.getpid()} at {detail}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
