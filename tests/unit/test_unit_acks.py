"""The ack window: one `multiple` ack for the run of ready deliveries at the front, and
nothing held behind a delivery that waits out a retry."""

from __future__ import annotations

from workers.acks import AckWindow, Release


def window_of(*tags: int) -> AckWindow:
    window = AckWindow()
    for tag in tags:
        window.delivered(tag)
    return window


def test_a_batch_at_the_front_is_acked_up_to_its_last_tag() -> None:
    window = window_of(1, 2, 3, 4, 5)
    assert window.ready([1, 2, 3]) == Release(3)
    assert len(window) == 2


def test_a_later_batch_waits_for_the_one_before_it_and_then_goes_with_it() -> None:
    window = window_of(1, 2, 3, 4, 5, 6)
    assert window.ready([4, 5, 6]) == Release()  # 1..3 still in the database
    assert window.ready([1, 2, 3]) == Release(6)
    assert len(window) == 0


def test_a_gap_stops_the_run() -> None:
    window = window_of(1, 2, 3, 4)
    assert window.ready([1, 3, 4]) == Release(1)
    assert window.ready([2]) == Release(4)


def test_a_delivery_handed_back_alone_is_passed_over_by_the_run() -> None:
    window = window_of(1, 2, 3)
    assert window.settled_alone([1]) == Release()
    assert window.ready([2]) == Release(2)  # 1 is no longer unacked at the broker
    assert window.settled_alone([3]) == Release()
    assert len(window) == 0


def test_what_waits_behind_a_retry_is_acked_alone_at_once_and_while_it_waits() -> None:
    window = window_of(1, 2, 3, 4, 5)
    assert window.ready([2, 3]) == Release()
    assert window.retrying([1]) == Release(None, [2, 3])
    assert window.ready([5]) == Release(None, [5])  # stored during the wait: not held
    window.resumed([1])
    assert window.ready([1]) == Release(1)  # multiple up to 1 only: 2, 3 and 5 are acked
    assert len(window) == 2  # 4 is still being stored; 5, acked alone, waits to be passed
    assert window.ready([4]) == Release(4)
    assert len(window) == 0


def test_a_retry_further_back_releases_the_run_in_front_of_it_and_what_follows() -> None:
    window = window_of(1, 2, 3, 4)
    assert window.retrying([2]) == Release()
    assert window.ready([4]) == Release()  # 1 is still being stored, not retrying
    assert window.ready([1]) == Release(1, [4])
    window.resumed([2])
    assert window.ready([2]) == Release(2)
    assert window.ready([3]) == Release(3)
