"""When to give up on a confirm channel that the broker refuses everything on. Pure.

On a RabbitMQ cluster older than 3.12.5, a channel whose first publish to a quorum queue went
to a leader that had just died keeps refusing every publish on it until that node is back
(fixed upstream in 3.12.5); a new channel publishes again. A queue that is only full refuses
too, but then the publishes to other queues are confirmed in between: only a channel that has
been refused everything, many times over some seconds, is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REFUSALS = 20
REFUSED_FOR_S = 5.0


@dataclass
class RefusalWatch:
    refusals: int = REFUSALS  # in a row, with no confirm in between
    refused_for_s: float = REFUSED_FOR_S  # from the first of them
    _count: int = field(default=0, init=False)
    _since: float = field(default=0.0, init=False)

    def confirmed(self) -> None:
        self._count = 0

    def refused(self, now: float) -> bool:
        """One more refusal at `now` (monotonic seconds); True when the channel should be
        replaced, and the count starts over."""
        if self._count == 0:
            self._since = now
        self._count += 1
        if self._count >= self.refusals and now - self._since >= self.refused_for_s:
            self._count = 0
            return True
        return False
