"""Topic binding keys: validation, and matching with the semantics of AMQP topic exchanges.

The table (tests/topic_table.py) is checked against RabbitMQ itself in
tests/integration/test_subscriptions.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from topic_table import TOPIC_TABLE

from callpipe.subscriptions import EventFilter, parse_time, target_queue
from schemas.topology import (
    InvalidBindingKeyError,
    Topology,
    topic_matches,
    validate_binding_key,
)


@pytest.mark.parametrize(("binding_key", "routing_key", "routed"), TOPIC_TABLE)
def test_topic_matches(binding_key: str, routing_key: str, routed: bool) -> None:
    assert topic_matches(binding_key, routing_key) is routed


def test_topic_matching_does_not_backtrack_exponentially() -> None:
    assert not topic_matches(".".join(["#"] * 40) + ".x", ".".join(["a"] * 60))


@pytest.mark.parametrize(
    "key", ["#", "*", "call.#", "call.ended.*", "*.*.missed", "#.missed", "звонок.#", "a-b_c.d"]
)
def test_good_binding_keys(key: str) -> None:
    assert validate_binding_key(key) == key


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        ("", "empty"),
        ("call..ended", "empty word"),
        (".call", "empty word"),
        ("call.", "empty word"),
        ("call.*ed", "whole words"),
        ("call.ended#", "whole words"),
        ("call.**", "whole words"),
        ("call ended", "whitespace"),
        ("call.ended\n", "whitespace"),
        ("a." * 128 + "a", "255 bytes"),
    ],
)
def test_bad_binding_keys(key: str, complaint: str) -> None:
    with pytest.raises(InvalidBindingKeyError, match=complaint):
        validate_binding_key(key)


def test_replay_targets() -> None:
    topology = Topology("ns")
    assert target_queue(topology, "crm") == "ns.sub.crm"
    assert target_queue(topology, "sink.missed") == "ns.sink.missed"
    assert target_queue(topology, "sink") == "ns.sub.sink"
    with pytest.raises(ValueError, match="must be 1-32 characters"):
        target_queue(topology, "sink.")
    with pytest.raises(ValueError, match="must be 1-32 characters"):
        target_queue(topology, "other.crm")


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=UTC)),
        ("2026-11-25T10:00:00", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        ("2026-11-25 13:00:00+03:00", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        (
            "2026-11-25T10:00:00.250+05:00",
            datetime(2026, 11, 25, 10, 0, 0, 250000, tzinfo=timezone(timedelta(hours=5))),
        ),
    ],
)
def test_parse_time(text: str, moment: datetime) -> None:
    assert parse_time(text) == moment
    assert parse_time(text).tzinfo is not None


@pytest.mark.parametrize("text", ["yesterday", "25.11.2026", "2026-13-01", ""])
def test_parse_time_refuses_what_is_not_iso_8601(text: str) -> None:
    with pytest.raises(ValueError, match="not an ISO 8601 date"):
        parse_time(text)


def test_event_filter_by_binding_keys() -> None:
    assert EventFilter().wants("call.started")
    wanted = EventFilter(bindings=("call.ended.missed", "call.started"))
    assert wanted.wants("call.started")
    assert wanted.wants("call.ended.missed")
    assert not wanted.wants("call.ended.answered")
