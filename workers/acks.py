"""Which deliveries of one consume channel one `basic.ack` with `multiple` can settle (pure).

The broker takes `multiple` as "every delivery up to and including this tag that is still
unacked". The deliveries of a channel carry rising tags, and batches finish out of order (two
run at once), so a committed delivery is acked only once every delivery before it on the
channel is settled too: the window releases the run of ready deliveries at its front, and
one ack covers that run. A delivery settled on its own (handed back, or acked while the
front waits out a retry) is no longer unacked, so a later `multiple` ack does not touch it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


class AckWindow:
    """The unsettled delivery tags of one channel, in delivery order."""

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._ready: set[int] = set()  # committed, waiting for the deliveries before them
        self._settled: set[int] = set()  # settled one by one, out of order
        self._retrying: set[int] = set()  # waiting out a retry: nothing waits behind them

    def delivered(self, tag: int) -> None:
        self._order.append(tag)

    def ready(self, tags: Iterable[int]) -> Release:
        """Mark deliveries ready to ack: what to ack now. A ready delivery waits for an
        unsettled one before it, unless that one is waiting out a retry (then it is acked
        alone, so that a retry never holds the others and the prefetch)."""
        self._ready.update(tags)
        last = None
        while self._order:
            front = self._order[0]
            if front in self._ready:
                self._ready.remove(front)
                last = front
            elif front in self._settled:
                self._settled.remove(front)
            else:
                break
            self._order.popleft()
        alone: list[int] = []
        if self._ready and self._order and self._order[0] in self._retrying:
            alone = sorted(self._ready)
            self._settle_alone(alone)
        return Release(last, alone)

    def retrying(self, tags: Iterable[int]) -> Release:
        """Deliveries start waiting out a retry: what waits behind them is released."""
        self._retrying.update(tags)
        return self.ready(())

    def resumed(self, tags: Iterable[int]) -> None:
        self._retrying.difference_update(tags)

    def settled_alone(self, tags: Iterable[int]) -> Release:
        """Deliveries handed back (or acked) one by one."""
        self._settle_alone(tags)
        return self.ready(())

    def _settle_alone(self, tags: Iterable[int]) -> None:
        for tag in tags:
            self._ready.discard(tag)
            self._retrying.discard(tag)
            self._settled.add(tag)

    def __len__(self) -> int:
        return len(self._order)


@dataclass(frozen=True, slots=True)
class Release:
    """Acks to send: one `multiple` ack up to a tag, and single ones."""

    multiple_up_to: int | None = None
    alone: list[int] = field(default_factory=list)
