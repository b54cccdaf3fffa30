"""The published envelope and its routing key."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from callpipe.sample import call_end, sample_call
from schemas import codec
from schemas.events import CallEvent, CallFields
from schemas.topology import HEADER_KIND, HEADER_PROJECT, HEADER_RECEIVED_AT, Kind, routing_key_of
from workers.delivery import ReceivedWebhook, decode_delivery
from workers.enrich import enrich
from workers.events import build_event, render_outbox

DOCUMENT: dict[str, Any] = {
    "id": "2891473",
    "caller": "89990009911",
    "date": "2024-03-10 14:30:00",
    "city": "Москва",
    "status": "BUSY",
    "duration": "0",
    "extra_field": {"a": [1, 2]},
}


def _received(kind: Kind, document: dict[str, Any] = DOCUMENT) -> ReceivedWebhook:
    headers = {
        HEADER_PROJECT: "shop",
        HEADER_KIND: kind,
        HEADER_RECEIVED_AT: "2024-03-10T11:30:05+00:00",
    }
    return decode_delivery(orjson.dumps(document), headers, kind)


def _event(kind: Kind, document: dict[str, Any] = DOCUMENT) -> CallEvent:
    webhook = _received(kind, document)
    call = enrich(webhook.payload, region="RU", tz=ZoneInfo("Europe/Moscow"))
    return build_event(webhook, call)


def test_call_end_event() -> None:
    event = _event("end")
    assert event.event_id == "shop:2891473:end"
    assert event.type == "call.ended"
    assert event.schema_ == "callpipe.call.v1"
    assert event.project == "shop"
    assert event.occurred_at == datetime(2024, 3, 10, 11, 30, tzinfo=UTC)
    assert event.received_at == datetime(2024, 3, 10, 11, 30, 5, tzinfo=UTC)
    assert event.call.outcome == "missed"
    assert event.call.caller == "+79990009911"
    assert event.raw == DOCUMENT


def test_call_start_event() -> None:
    event = _event("start", {"id": 5, "caller": "79990009911"})
    assert event.event_id == "shop:5:start"
    assert event.type == "call.started"
    assert event.occurred_at is None
    assert event.raw == {"id": 5, "caller": "79990009911"}


def test_envelope_on_the_wire() -> None:
    wire = codec.loads(codec.dumps(_event("end").to_json_dict()))
    assert set(wire) == {
        "event_id",
        "type",
        "schema",
        "occurred_at",
        "received_at",
        "project",
        "call",
        "raw",
    }
    assert wire["schema"] == "callpipe.call.v1"
    assert wire["occurred_at"] == "2024-03-10T11:30:00Z"
    assert wire["call"]["city"] == "Москва"
    assert wire["raw"] == DOCUMENT
    # A subscriber can read the envelope back into the model.
    assert CallEvent.model_validate(wire) == _event("end")


def test_the_event_carries_the_call_it_is_given_whole() -> None:
    """Storage hands over the merged row: an older start sent second shows the end's result."""
    webhook = _received("start", {"id": "2891473", "caller": "89990009911"})
    merged = CallFields(
        call_id="2891473",
        caller="+79990009911",
        called_at=datetime(2024, 3, 10, 11, 30, tzinfo=UTC),
        status="BUSY",
        outcome="missed",
        roistat_param_1="p1",
        first_visit="2024-03-01 10:00:00",
        revision=2,
        start_received_at=datetime(2024, 3, 10, 11, 31, tzinfo=UTC),
        end_received_at=datetime(2024, 3, 10, 11, 30, 5, tzinfo=UTC),
    )
    wire = codec.loads(codec.dumps(build_event(webhook, merged).to_json_dict()))
    assert wire["type"] == "call.started"
    assert wire["occurred_at"] == "2024-03-10T11:30:00Z"
    assert wire["call"]["revision"] == 2
    assert (wire["call"]["status"], wire["call"]["outcome"]) == ("BUSY", "missed")
    assert (wire["call"]["roistat_param_1"], wire["call"]["first_visit"]) == (
        "p1",
        "2024-03-01 10:00:00",
    )
    assert wire["call"]["start_received_at"] == "2024-03-10T11:31:00Z"
    assert wire["call"]["end_received_at"] == "2024-03-10T11:30:05Z"
    assert routing_key_of(wire) == "call.started"
    assert CallFields.model_validate(wire["call"]) == merged


@pytest.mark.parametrize(
    ("document", "kind", "routing_key"),
    [
        pytest.param({"id": "a"}, "start", "call.started", id="start"),
        pytest.param({"id": "a", "status": "ANSWER"}, "start", "call.started", id="start-status"),
        pytest.param({"id": "a", "status": "ANSWER"}, "end", "call.ended.answered", id="answer"),
        pytest.param({"id": "a", "status": "CANCEL"}, "end", "call.ended.missed", id="cancel"),
        pytest.param({"id": "a", "status": "congestion"}, "end", "call.ended.failed", id="failed"),
        pytest.param({"id": "a", "status": "DONTCALL"}, "end", "call.ended.blocked", id="blocked"),
        pytest.param({"id": "a", "status": "WHATEVER"}, "end", "call.ended.unknown", id="unknown"),
        pytest.param({"id": "a", "duration": 3}, "end", "call.ended.unknown", id="no-status"),
    ],
)
def test_routing_key_of_a_stored_envelope(
    document: dict[str, Any], kind: Kind, routing_key: str
) -> None:
    stored = codec.loads(codec.dumps(_event(kind, document).to_json_dict()))
    assert routing_key_of(stored) == routing_key


@pytest.mark.parametrize(
    ("event", "routing_key"),
    [
        ({"type": "call.started", "call": {"outcome": None}}, "call.started"),
        ({"type": "call.ended", "call": {"outcome": "missed"}}, "call.ended.missed"),
        ({"type": "call.ended", "call": None}, "call.ended.unknown"),
        ({"type": "call.ended"}, "call.ended.unknown"),
        # A hand-made or requeued envelope whose call is not an object: no outcome, no error.
        ({"type": "call.ended", "call": "c1"}, "call.ended.unknown"),
        ({"type": "call.ended", "call": ["c1"]}, "call.ended.unknown"),
    ],
)
def test_routing_key_of_sparse_envelopes(event: dict[str, Any], routing_key: str) -> None:
    assert routing_key_of(event) == routing_key


def _merged_row(call: CallFields, n: int) -> dict[str, Any]:
    """A `calls` row as asyncpg returns it after the upsert: the webhook's fields plus the
    storage-only ones, times with and without microseconds."""
    row = call.model_dump()
    row.update(
        is_repeat_caller=n % 3 == 0,
        previous_calls=n % 4,
        revision=1 + n % 2,
        start_received_at=datetime(2024, 3, 10, 11, 30, 1, 123456 * (n % 2), tzinfo=UTC),
        end_received_at=None if n % 2 else datetime(2024, 3, 10, 11, 31, tzinfo=UTC),
        stale_at=None,
    )
    return row


@pytest.mark.parametrize(
    "received_at", ["2024-03-10T11:30:05+00:00", "2024-03-10T14:30:05.5+03:00"]
)
def test_the_fast_envelope_is_byte_for_byte_the_models_envelope(received_at: str) -> None:
    """The worker encodes events without the models; what it sends must not differ by a byte
    from the model's envelope, over the sample generator's variety of calls."""
    rng = random.Random(7)
    callers = ["79990001122", "+380501234567", "anonymous", ""]
    for n in range(200):
        start = sample_call(rng, n, datetime(2024, 3, 10, 11, 30, tzinfo=UTC), callers)
        document = start if n % 2 else call_end(rng, start)
        if n % 5 == 0:
            document["custom_fields"] = [{"k": n}] if n % 10 else {"deal": str(n)}
        kind: Kind = "start" if n % 2 else "end"
        webhook = decode_delivery(
            orjson.dumps(document),
            {HEADER_PROJECT: "shop", HEADER_KIND: kind, HEADER_RECEIVED_AT: received_at},
            kind,
        )
        call = enrich(webhook.payload, region="RU", tz=ZoneInfo("Europe/Moscow"))
        row = _merged_row(call, n)
        fast = render_outbox(webhook, row)
        model = build_event(webhook, CallFields.model_validate(row))
        assert fast.body == codec.dumps(model.to_json_dict()), n
        assert fast.event_id == model.event_id
        assert fast.routing_key == routing_key_of(model.to_json_dict())
