"""When a confirm channel that the broker refuses everything on is given up."""

from __future__ import annotations

from infra.refusals import RefusalWatch


def test_many_refusals_over_some_seconds_replace_the_channel() -> None:
    watch = RefusalWatch(refusals=3, refused_for_s=5.0)
    assert [watch.refused(now) for now in (100.0, 101.0, 104.0)] == [False, False, False]
    assert watch.refused(105.0)  # the fourth, 5 s after the first
    assert not watch.refused(106.0)  # counted from the start again


def test_a_confirm_in_between_starts_the_count_again() -> None:
    watch = RefusalWatch(refusals=3, refused_for_s=0.0)
    assert not watch.refused(1.0) and not watch.refused(2.0)
    watch.confirmed()  # a publish to another queue went through: only a queue is full
    assert [watch.refused(now) for now in (3.0, 4.0, 5.0)] == [False, False, True]


def test_many_refusals_in_a_moment_are_not_enough() -> None:
    watch = RefusalWatch(refusals=3, refused_for_s=5.0)
    assert not any(watch.refused(10.0 + n * 0.01) for n in range(50))  # a burst: 0.5 s
