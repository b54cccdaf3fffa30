"""The one decision (ack, retry, dead-letter) and the backoff between retries."""

from __future__ import annotations

import itertools
import random

import pytest

from workers.errors import (
    Action,
    PermanentError,
    RetryPolicy,
    TransientError,
    backoff_delay,
    decide,
)

POLICY = RetryPolicy(max_unexpected_attempts=5, base_delay_s=0.2, max_delay_s=30.0)


class _SubTransient(TransientError):
    pass


class _SubPermanent(PermanentError):
    pass


@pytest.mark.parametrize(
    ("error", "attempt", "action"),
    [
        pytest.param(None, 0, Action.ACK, id="success"),
        pytest.param(None, 7, Action.ACK, id="success-after-failures"),
        pytest.param(TransientError("db down"), 1, Action.RETRY, id="transient-first"),
        pytest.param(TransientError("db down"), 5, Action.RETRY, id="transient-at-max"),
        pytest.param(TransientError("db down"), 10_000, Action.RETRY, id="transient-forever"),
        pytest.param(_SubTransient("x"), 50, Action.RETRY, id="transient-subclass"),
        pytest.param(PermanentError("bad"), 1, Action.DEAD_LETTER, id="permanent-first"),
        pytest.param(_SubPermanent("bad"), 1, Action.DEAD_LETTER, id="permanent-subclass"),
        pytest.param(ValueError("bug"), 1, Action.RETRY, id="unexpected-1"),
        pytest.param(KeyError("bug"), 4, Action.RETRY, id="unexpected-4"),
        pytest.param(TypeError("bug"), 5, Action.DEAD_LETTER, id="unexpected-5-is-max"),
        pytest.param(RuntimeError("bug"), 6, Action.DEAD_LETTER, id="unexpected-past-max"),
    ],
)
def test_decide(error: BaseException | None, attempt: int, action: Action) -> None:
    assert decide(error, attempt, POLICY) is action


@pytest.mark.parametrize(("max_attempts", "last_retry"), [(1, 0), (2, 1), (3, 2)])
def test_decide_honours_the_policy_limit(max_attempts: int, last_retry: int) -> None:
    policy = RetryPolicy(max_unexpected_attempts=max_attempts)
    error = RuntimeError("bug")
    if last_retry:
        assert decide(error, last_retry, policy) is Action.RETRY
    assert decide(error, last_retry + 1, policy) is Action.DEAD_LETTER


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [
        (0, 0.2),
        (1, 0.2),
        (2, 0.4),
        (3, 0.8),
        (4, 1.6),
        (5, 3.2),
        (8, 25.6),
        (9, 30.0),
        (20, 30.0),
        (1_000, 30.0),
        (10_000, 30.0),  # a database down for hours: the cap, not an OverflowError
    ],
)
def test_backoff_delay_bounds(attempt: int, ceiling: float) -> None:
    rand = random.Random(attempt)
    for _ in range(50):
        delay = backoff_delay(attempt, POLICY, rand)
        assert ceiling / 2 <= delay <= ceiling
        assert delay > 0


def test_backoff_delay_grows_exponentially_until_the_cap() -> None:
    # The same draw for each attempt isolates the exponential part from the jitter.
    delays = [backoff_delay(attempt, POLICY, random.Random(42)) for attempt in range(1, 12)]
    for previous, current in itertools.pairwise(delays):
        assert current == pytest.approx(min(previous * 2, delays[-1]))
    assert delays[-1] <= POLICY.max_delay_s
    assert delays[-1] == delays[-2]


def test_backoff_delay_is_jittered() -> None:
    rand = random.Random(7)
    delays = {backoff_delay(6, POLICY, rand) for _ in range(20)}
    assert len(delays) > 1


def test_backoff_delay_is_reproducible_with_a_seed() -> None:
    first = [backoff_delay(n, POLICY, random.Random(3)) for n in range(1, 10)]
    second = [backoff_delay(n, POLICY, random.Random(3)) for n in range(1, 10)]
    assert first == second


def test_backoff_delay_without_a_random_source() -> None:
    assert 0.1 <= backoff_delay(1, POLICY) <= 0.2


def test_backoff_delay_respects_a_custom_cap() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=2.5)
    rand = random.Random(0)
    assert all(1.25 <= backoff_delay(n, policy, rand) <= 2.5 for n in range(3, 40))
