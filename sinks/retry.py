"""A sink's retry schedule: which delay queue a failed delivery waits in, and when to stop. Pure.

Delays are RabbitMQ queues with a fixed message TTL that dead-letter back into the sink's
queue, so a wait survives a restart of the sink process. One queue per distinct delay keeps
expiry first-in first-out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sinks.port import DeliveryResult, Done, GiveUp

# 5 s, 30 s, 2 min, 10 min, then every 30 min: with 24 attempts a destination may be down
# for about ten hours before an event is dead-lettered.
DEFAULT_DELAYS_S: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 1800.0)
DEFAULT_MAX_ATTEMPTS = 24


@dataclass(frozen=True)
class Ack:
    """Settled: nothing more to do."""


@dataclass(frozen=True)
class Delay:
    """Publish to the delay queue of `delay_s` with `attempt` as its next attempt number."""

    delay_s: float
    attempt: int
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    reason: str


SinkAction = Ack | Delay | DeadLetter


@dataclass(frozen=True)
class RetrySchedule:
    delays_s: tuple[float, ...] = DEFAULT_DELAYS_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def delay_for(self, attempt: int, hint_s: float | None = None) -> float:
        """The wait after failed attempt `attempt` (1-based): the schedule's step, or the
        shortest configured delay that honours the destination's hint."""
        step = self.delays_s[min(max(attempt, 1), len(self.delays_s)) - 1]
        if hint_s is None or hint_s <= step:
            return step
        return next((d for d in sorted(self.delays_s) if d >= hint_s), max(self.delays_s))


def next_action(result: DeliveryResult, attempt: int, schedule: RetrySchedule) -> SinkAction:
    """What to do with a delivery whose attempt number `attempt` ended with `result`."""
    if isinstance(result, Done):
        return Ack()
    if isinstance(result, GiveUp):
        return DeadLetter(result.reason)
    if attempt >= schedule.max_attempts:
        return DeadLetter(f"gave up after {attempt} attempts: {result.reason}")
    return Delay(schedule.delay_for(attempt, result.after_s), attempt + 1, result.reason)


def delay_label(delay_s: float) -> str:
    """A delay as it appears in a queue name: `5s`, `1800s`, `0.25s`."""
    return f"{delay_s:g}s"
