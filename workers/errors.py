"""Failure classes and the one decision of what to do with a failed delivery."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class TransientError(Exception):
    """The world is briefly unavailable (database, broker): the same delivery will succeed later."""


class PermanentError(Exception):
    """This delivery can never be processed: it goes to `{ns}.dead` with the reason."""


class Action(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying. Unexpected errors (bugs, poison data) get a few tries only."""

    max_unexpected_attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 30.0


def decide(error: BaseException | None, unexpected_failures: int, policy: RetryPolicy) -> Action:
    """Ack a success; retry transient failures for as long as it takes; dead-letter the rest.

    `unexpected_failures` counts this delivery's failures that were neither transient nor
    permanent, this one included: transient ones (an outage) never use up that budget.
    """
    if error is None:
        return Action.ACK
    if isinstance(error, TransientError):
        return Action.RETRY
    if isinstance(error, PermanentError):
        return Action.DEAD_LETTER
    if unexpected_failures < policy.max_unexpected_attempts:
        return Action.RETRY
    return Action.DEAD_LETTER


def backoff_delay(attempt: int, policy: RetryPolicy, rand: random.Random | None = None) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2**(attempt-1))."""
    # Transient failures retry without limit; 2.0 ** 1024 would raise OverflowError.
    exponent = min(max(attempt - 1, 0), 1023)
    ceiling: float = min(policy.max_delay_s, policy.base_delay_s * 2.0**exponent)
    draw: float = (rand or random).random()
    return ceiling * (0.5 + draw / 2)
