"""Dead letters and rejected bodies as the commands see them: ids, ages, masks, targets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from callpipe.dead_letters import (
    Keep,
    dead_reason,
    dead_source,
    dead_target,
    describe,
    rejected_target,
    row,
)
from callpipe.letters import Letter, age_seconds, format_age, letter_id, parse_duration
from callpipe.queue_scan import Target
from infra.kept_queues import (
    KeptQueueBounds,
    kept_queue_arguments,
    policy_command,
    vhost_of,
)
from infra.masking import mask_text, masked, masked_phones
from schemas import codec
from schemas.topology import Topology

TOPOLOGY = Topology("ns")
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
WEBHOOK = codec.dumps({"id": "c1", "caller": "79990009911", "callee": "74950001122"})


def letter(
    body: bytes = WEBHOOK,
    routing_key: str = "roistat.call.end",
    message_id: str = "acme:c1:end",
    **headers: Any,
) -> Letter:
    return Letter(
        body, routing_key, message_id, {k.replace("_", "-"): v for k, v in headers.items()}
    )


def test_the_id_ignores_what_the_broker_changes_on_each_read() -> None:
    first = letter(x_callpipe_error="boom")
    reread = letter(x_callpipe_error="boom", x_delivery_count=7)
    # A copy through the default exchange: the routing key travels in a header.
    copied = Letter(
        WEBHOOK,
        "ns.dead",
        "acme:c1:end",
        {"x-callpipe-error": "boom", "x-callpipe-routing-key": "roistat.call.end"},
    )
    assert letter_id(first) == letter_id(reread) == letter_id(copied)
    assert len(letter_id(first)) == 12
    assert letter_id(first) != letter_id(letter(x_callpipe_error="other"))
    assert letter_id(first) != letter_id(letter(body=b"{}", x_callpipe_error="boom"))


def test_header_bytes_and_text_give_the_same_id() -> None:
    assert letter_id(letter(x_callpipe_error=b"boom")) == letter_id(letter(x_callpipe_error="boom"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("12h", 43200), ("30m", 1800), ("45s", 45), ("1d12h", 129600), ("0s", 0)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "7d 2h", "-1d", "1.5h", "h7"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "?"),
        (5, "5s"),
        (125, "2m"),
        (3 * 3600 + 300, "3h05m"),
        (2 * 86400 + 4 * 3600, "2d04h"),
    ],
)
def test_ages(seconds: float | None, shown: str) -> None:
    assert format_age(seconds) == shown


def test_age_counts_from_the_latest_known_time() -> None:
    received = (NOW - timedelta(days=9)).isoformat()
    requeued = (NOW - timedelta(hours=2)).isoformat()
    assert age_seconds(letter(x_callpipe_received_at=received), NOW) == 9 * 86400
    both = letter(x_callpipe_received_at=received, x_callpipe_requeued_at=requeued)
    assert age_seconds(both, NOW) == 2 * 3600
    death = {"time": NOW - timedelta(minutes=5), "queue": "ns.call-end", "reason": "rejected"}
    assert age_seconds(letter(x_death=[death], x_callpipe_received_at=received), NOW) == 300
    assert age_seconds(letter(body=b"junk"), NOW) is None


def test_phones_are_masked_in_fields_and_in_text() -> None:
    assert masked_phones(codec.loads(WEBHOOK), WEBHOOK) == ["7999*****11", "7495*****22"]
    assert masked_phones(None, b"call me on 79990009911, now") == ["7999*****11"]
    assert mask_text("caller 79990009911 (+79990009911)") == "caller 7999*****11 (+799******11)"
    # Dates, times and ids are not phones.
    assert mask_text("2025-03-10 12:00:00, call 12345") == "2025-03-10 12:00:00, call 12345"
    document = {
        "id": "79990009911",
        "caller": 79990009911,
        "custom_fields": [{"value": "79990001234"}],
        "call": {"callee": "+74950001122", "duration": 35},
    }
    assert masked(document) == {
        "id": "79990009911",
        "caller": "7999*****11",
        "custom_fields": [{"value": "7999*****34"}],
        "call": {"callee": "+749******22", "duration": 35},
    }


def test_list_row_and_show_never_print_a_raw_phone_unless_asked() -> None:
    dead = letter(x_callpipe_error="PermanentError: bad caller 79990009911")
    shown = row(dead, dead_source(dead, TOPOLOGY), dead_reason(dead), NOW)
    assert (shown.source, shown.call_id, shown.phones) == (
        "ns.call-end",
        "c1",
        "7999*****11,7495*****22",
    )
    assert "79990009911" not in repr(shown)
    text = "\n".join(describe(dead, "ns.call-end", dead_reason(dead), NOW, unmasked=False))
    assert "79990009911" not in text and "74950001122" not in text
    assert "7999*****11" in text
    raw = "\n".join(describe(dead, "ns.call-end", dead_reason(dead), NOW, unmasked=True))
    assert "79990009911" in raw


def test_sources_and_reasons() -> None:
    sink = letter(routing_key="call.ended.missed", x_callpipe_sink="crm", x_callpipe_error="410")
    assert dead_source(sink, TOPOLOGY) == "sink:crm"
    by_broker = letter(x_first_death_queue="ns.sub.bi", x_first_death_reason="delivery_limit")
    assert dead_source(by_broker, TOPOLOGY) == "ns.sub.bi"
    assert dead_reason(by_broker) == "broker: delivery_limit"
    assert dead_source(letter(routing_key="roistat.call.start"), TOPOLOGY) == "ns.call-start"
    assert dead_source(letter(routing_key="x"), TOPOLOGY) == "?"
    assert dead_reason(letter()) == "-"


def test_a_webhook_goes_back_to_the_webhooks_exchange_without_its_death() -> None:
    dead = letter(
        x_callpipe_project="acme",
        x_callpipe_error="boom",
        x_death=[{"queue": "ns.call-end"}],
        x_first_death_queue="ns.call-end",
        x_delivery_count=3,
    )
    target = dead_target(dead, TOPOLOGY, NOW)
    assert isinstance(target, Target)
    assert (target.exchange, target.routing_key, target.message_id) == (
        "ns.webhooks",
        "roistat.call.end",
        "acme:c1:end",
    )
    assert target.headers == {
        "x-callpipe-project": "acme",
        "x-callpipe-requeued-at": NOW.isoformat(),
    }


def test_a_sinks_event_goes_back_to_its_queue_with_its_attempts_reset() -> None:
    event = codec.dumps({"event_id": "acme:c1:end", "call": {"call_id": "c1"}})
    dead = letter(
        body=event,
        routing_key="call.ended.missed",
        x_callpipe_sink="crm",
        x_callpipe_attempt=7,
        x_callpipe_error="HTTP 410",
        x_callpipe_routing_key="call.ended.missed",
    )
    target = dead_target(dead, TOPOLOGY, NOW)
    assert isinstance(target, Target)
    assert (target.exchange, target.routing_key) == ("", "ns.sink.crm")
    assert target.headers == {
        "x-callpipe-routing-key": "call.ended.missed",
        "x-callpipe-requeued-at": NOW.isoformat(),
    }
    junk = letter(body=b"not json", x_callpipe_sink="crm")
    assert isinstance(dead_target(junk, TOPOLOGY, NOW), Keep)


@pytest.mark.parametrize("queue", ["ns.sink.crm", "ns.sink.crm.retry.30s"])
def test_a_sinks_event_the_broker_dead_lettered_goes_back_to_the_sinks_queue(queue: str) -> None:
    """Past the queue's delivery limit (a sink crashing on it again and again) the broker
    dead-letters the event with no sink header: its death queue names the sink."""
    event = codec.dumps({"event_id": "acme:c1:end", "call": {"call_id": "c1"}})
    dead = letter(
        body=event,
        routing_key="call.ended.missed",
        x_first_death_queue=queue,
        x_first_death_reason="delivery_limit",
    )
    target = dead_target(dead, TOPOLOGY, NOW)
    assert isinstance(target, Target)
    assert (target.exchange, target.routing_key) == ("", "ns.sink.crm")
    assert target.headers["x-callpipe-routing-key"] == "call.ended.missed"
    other = letter(body=event, routing_key="x", x_first_death_queue="other.sink.crm")
    assert isinstance(dead_target(other, TOPOLOGY, NOW), Keep)


def test_a_subscriptions_event_goes_back_to_its_queue_and_junk_stays() -> None:
    event = letter(routing_key="call.started", x_first_death_queue="ns.sub.bi")
    target = dead_target(event, TOPOLOGY, NOW)
    assert isinstance(target, Target)
    assert (target.exchange, target.routing_key) == ("", "ns.sub.bi")
    assert target.headers["x-callpipe-routing-key"] == "call.started"
    assert isinstance(dead_target(letter(body=b"junk", routing_key="x"), TOPOLOGY, NOW), Keep)


def test_a_rejected_body_is_requeued_only_when_the_ingress_would_accept_it_today() -> None:
    received = (NOW - timedelta(days=1)).isoformat()
    headers = {
        "x_callpipe_project": "acme",
        "x_callpipe_received_at": received,
        "x_callpipe_remote_addr": "10.0.0.1",
        "x_callpipe_reject_reason": "missing_id",
    }
    end = letter(body=codec.dumps({"id": 42, "status": "ANSWER"}), **headers)
    target = rejected_target(end, TOPOLOGY, NOW)
    assert isinstance(target, Target)
    assert (target.exchange, target.routing_key, target.message_id) == (
        "ns.webhooks",
        "roistat.call.end",
        "acme:42:end",
    )
    assert target.headers == {
        "x-callpipe-project": "acme",
        "x-callpipe-kind": "end",
        "x-callpipe-received-at": received,
        "x-callpipe-remote-addr": "10.0.0.1",
        "x-callpipe-requeued-at": NOW.isoformat(),
    }
    # The endpoint's kind, when the ingress knew it, wins over detection.
    start = letter(
        body=codec.dumps({"id": 42, "status": "ANSWER"}), x_callpipe_kind="start", **headers
    )
    assert isinstance(target := rejected_target(start, TOPOLOGY, NOW), Target)
    assert target.routing_key == "roistat.call.start"
    invalid = rejected_target(letter(body=b"[1, 2]", **headers), TOPOLOGY, NOW)
    assert isinstance(invalid, Keep) and "not_object" in invalid.reason
    assert isinstance(rejected_target(letter(), TOPOLOGY, NOW), Keep)  # no project


def test_new_kept_queues_are_bounded_and_never_dead_letter_anything() -> None:
    bounds = KeptQueueBounds.of(3, 1000, 2, 0)
    assert kept_queue_arguments(bounds.dead) == {
        "x-queue-type": "quorum",
        "x-overflow": "reject-publish",
        "x-max-length": 3,
        "x-max-length-bytes": 1000,
    }
    assert kept_queue_arguments(bounds.rejected) == {
        "x-queue-type": "quorum",
        "x-overflow": "drop-head",
        "x-max-length": 2,
    }


def test_the_policy_command_for_an_existing_queue() -> None:
    bound = KeptQueueBounds.of(3, 1000, 2, 0).dead
    assert policy_command("ns.dead", bound, "/") == (
        "rabbitmqctl set_policy -p '/' --apply-to queues --priority 10 ns-dead-bound "
        '\'^ns\\.dead$\' \'{"overflow":"reject-publish","max-length":3,"max-length-bytes":1000}\''
    )
    assert vhost_of("amqp://u:p@host:5672/") == "/"
    assert vhost_of("amqp://u:p@host:5672") == "/"
    assert vhost_of("amqp://u:p@host/prod%2Fa") == "prod/a"
