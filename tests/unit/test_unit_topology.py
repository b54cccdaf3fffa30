"""Names of exchanges, queues and routing keys, from the namespace."""

from __future__ import annotations

import pytest

from schemas.topology import (
    ROUTING_KEY_BY_KIND,
    ROUTING_KEY_REJECTED,
    InvalidNamespaceError,
    Topology,
    event_id,
    event_routing_key,
    validate_namespace,
)


@pytest.mark.parametrize("namespace", ["callpipe", "test_1a2b", "a", "a" * 48, "ns_"])
def test_topology_names(namespace: str) -> None:
    topology = Topology(namespace)
    assert topology.webhooks_exchange == f"{namespace}.webhooks"
    assert topology.events_exchange == f"{namespace}.events"
    assert topology.dead_exchange == f"{namespace}.dead"
    assert topology.dead_queue == f"{namespace}.dead"
    assert topology.rejected_queue == f"{namespace}.rejected"
    assert topology.call_queue("start") == f"{namespace}.call-start"
    assert topology.call_queue("end") == f"{namespace}.call-end"
    assert topology.work_queues == {
        f"{namespace}.call-start": "*.call.start",
        f"{namespace}.call-end": "*.call.end",
        f"{namespace}.rejected": "*.rejected",
    }


def test_ingress_routing_keys_match_the_queue_bindings() -> None:
    """Each key the ingress publishes reaches exactly one work queue (topic `*` = one word)."""
    bindings = Topology("callpipe").work_queues.values()
    keys = [*ROUTING_KEY_BY_KIND.values(), ROUTING_KEY_REJECTED]
    assert keys == ["roistat.call.start", "roistat.call.end", "roistat.rejected"]
    for key in keys:
        matching = [b for b in bindings if b.split(".")[1:] == key.split(".")[1:]]
        assert len(matching) == 1, key


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param("", id="empty"),
        pytest.param("Callpipe", id="upper-case"),
        pytest.param("1callpipe", id="leading-digit"),
        pytest.param("_callpipe", id="leading-underscore"),
        pytest.param("call-pipe", id="dash"),
        pytest.param("call.pipe", id="dot"),
        pytest.param("call pipe", id="space"),
        pytest.param("звонки", id="cyrillic"),
        pytest.param("a" * 49, id="too-long"),
        pytest.param("callpipe\n", id="trailing-newline"),
    ],
)
def test_bad_namespaces(namespace: str) -> None:
    with pytest.raises(InvalidNamespaceError, match="namespace"):
        validate_namespace(namespace)
    with pytest.raises(InvalidNamespaceError):
        Topology(namespace)


def test_validate_namespace_returns_a_good_one() -> None:
    assert validate_namespace("callpipe_test") == "callpipe_test"


@pytest.mark.parametrize(
    ("event_type", "outcome", "routing_key"),
    [
        ("call.started", None, "call.started"),
        ("call.started", "answered", "call.started"),
        ("call.ended", "answered", "call.ended.answered"),
        ("call.ended", "missed", "call.ended.missed"),
        ("call.ended", "failed", "call.ended.failed"),
        ("call.ended", "blocked", "call.ended.blocked"),
        ("call.ended", "unknown", "call.ended.unknown"),
        ("call.ended", None, "call.ended.unknown"),
        ("call.ended", "", "call.ended.unknown"),
    ],
)
def test_event_routing_key(event_type: str, outcome: str | None, routing_key: str) -> None:
    assert event_routing_key(event_type, outcome) == routing_key


def test_event_id() -> None:
    assert event_id("shop", "2891473", "start") == "shop:2891473:start"
    assert event_id("shop", "2891473", "end") != event_id("shop", "2891473", "start")
