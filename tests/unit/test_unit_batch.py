"""The pure rules that let a batch be stored with a few multi-row statements."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.batch import call_key, caller_key, first_of_each, halves, lock_id, lock_ids, rounds


def test_items_that_share_nothing_are_one_round() -> None:
    keys = [[call_key("p", str(n)), caller_key("p", f"+7{n}")] for n in range(5)]
    assert rounds(keys) == [[0, 1, 2, 3, 4]]


def test_a_start_and_its_end_go_to_successive_rounds_in_arrival_order() -> None:
    keys = [[call_key("p", "a")], [call_key("p", "b")], [call_key("p", "a")]]
    assert rounds(keys) == [[0, 1], [2]]


def test_calls_from_one_caller_are_stored_one_round_after_another() -> None:
    keys = [[call_key("p", str(n)), caller_key("p", "+79990001122")] for n in range(3)]
    assert rounds(keys) == [[0], [1], [2]]


def test_a_shared_key_orders_an_item_after_every_earlier_item_it_meets() -> None:
    # c meets a by its caller and b by its call: it must come after both.
    a = [call_key("p", "1"), caller_key("p", "x")]
    b = [call_key("p", "2"), caller_key("p", "y")]
    b_again = [call_key("p", "2")]
    c = [call_key("p", "2"), caller_key("p", "x")]
    assert rounds([a, b, b_again, c]) == [[0, 1], [2], [3]]


def test_projects_do_not_share_keys() -> None:
    assert rounds([[call_key("p", "1")], [call_key("q", "1")]]) == [[0, 1]]
    assert caller_key("p", "1") != call_key("p", "1")


keys_strategy = st.lists(
    st.lists(
        st.sampled_from([call_key("p", c) for c in "abcd"] + [caller_key("p", "x")]),
        min_size=1,
        max_size=3,
    ),
    max_size=30,
)


@given(keys_strategy)
def test_rounds_keep_every_item_once_and_never_put_two_sharers_together(
    keys: list[list[str]],
) -> None:
    result = rounds(keys)
    assert sorted(i for round_ in result for i in round_) == list(range(len(keys)))
    round_of = {i: n for n, round_ in enumerate(result) for i in round_}
    for i in range(len(keys)):
        for j in range(i):
            if set(keys[i]) & set(keys[j]):
                assert round_of[j] < round_of[i]


def test_lock_ids_are_sorted_distinct_signed_64_bit_and_stable() -> None:
    ids = lock_ids([[call_key("p", "1"), caller_key("p", "x")], [caller_key("p", "x")]])
    assert ids == sorted(ids) and len(ids) == 2
    assert all(-(2**63) <= i < 2**63 for i in ids)
    # The same in every process (no salted hash()): a value computed once, by hand.
    assert lock_id("") == int.from_bytes(bytes.fromhex("e4a6a0577479b2b4"), "big", signed=True)


def test_first_of_each_keeps_the_first_copy_of_a_repeated_id() -> None:
    assert first_of_each(["a", "b", "a", "c", "b"]) == [0, 1, 3]


def test_halves_split_a_batch_and_keep_its_order() -> None:
    assert halves([1, 2, 3]) == ([1, 2], [3])
    assert halves([1]) == ([1], [])
