"""The frames a consumer receives most, decoded by callpipe: the same objects as pamqp's
(aiormq's own decoder) builds from the same bytes, or left to pamqp."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pamqp import body, commands, header, heartbeat
from pamqp import frame as pamqp_frame
from pamqp.common import FieldTable

from infra import amqp_frames
from infra.amqp_decode import decode_frame

PROPERTIES = commands.Basic.Properties
CALL_HEADERS: FieldTable = {
    "x-callpipe-project": "acme",
    "x-callpipe-kind": "end",
    "x-callpipe-received-at": "2026-11-27T10:00:00.123456+00:00",
    "x-callpipe-remote-addr": "10.0.0.7",
}


def as_fields(value: Any) -> Any:
    """A pamqp object as plain data, to compare (pamqp compares only properties by value)."""
    if isinstance(value, PROPERTIES):
        return {name: getattr(value, name) for name in PROPERTIES.__slots__}
    if isinstance(value, header.ContentHeader):
        fields = (value.class_id, value.weight, value.body_size, as_fields(value.properties))
        return ("ContentHeader", *fields)
    if isinstance(value, body.ContentBody):
        return ("ContentBody", value.value)
    slots = getattr(type(value), "__slots__", [])
    return (type(value).__name__, {name: getattr(value, name) for name in slots})


def decoded_alike(data: bytes) -> Any:
    """What decode_frame made of `data` (None: it left it to pamqp), checked against pamqp."""
    ours = decode_frame(data)
    if ours is not None:
        used, channel, frame = pamqp_frame.unmarshal(data)
        assert (ours[0], ours[1], as_fields(ours[2])) == (used, channel, as_fields(frame))
        assert type(ours[2]) is type(frame)
    return ours


def marshal(frame: Any, channel: int = 1) -> bytes:
    return pamqp_frame.marshal(frame, channel)


def test_a_webhook_delivery_is_decoded_here_as_pamqp_decodes_it() -> None:
    payload = b'{"id": "c-1", "caller": "79991234567"}'
    properties = PROPERTIES(
        content_type="application/json",
        headers=CALL_HEADERS,
        delivery_mode=2,
        message_id="acme:c-1:end",
    )
    frames = [
        commands.Basic.Deliver("ctag-1", 2**40 + 7, True, "acme.webhooks", "roistat.call.end"),
        header.ContentHeader(0, len(payload), properties),
        body.ContentBody(payload),
        commands.Basic.Ack(123456, multiple=True),
        commands.Basic.Ack(9, multiple=False),
    ]
    for frame in frames:
        assert decoded_alike(marshal(frame, channel=3)) is not None, frame


@pytest.mark.parametrize("seed", range(200))
def test_any_basic_properties_come_out_as_pamqp_reads_them(seed: int) -> None:
    rng = random.Random(seed)
    maybe: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "gzip",
        "headers": rng.choice([CALL_HEADERS, {}, {"n": 5, "s": "x", "nested": {"a": [1, "b"]}}]),
        "delivery_mode": rng.choice([1, 2]),
        "priority": rng.randrange(10),
        "correlation_id": "corr-é",
        "reply_to": "amq.rabbitmq.reply-to",
        "expiration": "60000",
        "message_id": "acme:c-ü:start",
        "timestamp": datetime(2026, 11, 27, 10, 0, tzinfo=UTC),
        "message_type": "call",
        "user_id": "guest",
        "app_id": "callpipe",
    }
    chosen = {name: value for name, value in maybe.items() if rng.random() < 0.5}
    frame = header.ContentHeader(0, rng.randrange(2**33), PROPERTIES(**chosen))
    decoded = decoded_alike(marshal(frame))
    if "timestamp" not in chosen:  # left to pamqp, which makes the datetime its own way
        assert decoded is not None


def test_header_values_of_other_types_are_read_by_pamqp_in_place() -> None:
    headers: FieldTable = {
        "x-delivery-count": 3,
        "x-first": "a",
        "x-death": [{"count": 1, "reason": "rejected", "queue": "q"}],
        "flag": True,
        "price": Decimal("1.25"),
        "x-last": "z",
    }
    frame = header.ContentHeader(0, 10, PROPERTIES(headers=headers, message_id="m"))
    decoded = decoded_alike(marshal(frame))
    assert decoded is not None
    assert decoded[2].properties.headers["x-last"] == "z"


def test_a_header_long_string_that_is_not_text_stays_bytes_as_in_pamqp() -> None:
    table = b"\x01k" + b"S" + (2).to_bytes(4, "big") + b"\xff\xfe"
    payload = (
        (60).to_bytes(2, "big")
        + bytes(2)
        + (5).to_bytes(8, "big")
        + (1 << 13).to_bytes(2, "big")
        + len(table).to_bytes(4, "big")
        + table
    )
    data = amqp_frames.frame(amqp_frames.FRAME_HEADER, 1, payload)
    decoded = decoded_alike(data)
    assert decoded is not None and decoded[2].properties.headers == {"k": b"\xff\xfe"}


@pytest.mark.parametrize(
    "frame",
    [
        heartbeat.Heartbeat(),
        commands.Basic.ConsumeOk("ctag"),
        commands.Basic.Nack(5, multiple=True, requeue=False),
        commands.Basic.Return(312, "NO_ROUTE", "acme.webhooks", "x"),
        commands.Channel.Close(406, "PRECONDITION_FAILED", 50, 10),
    ],
    ids=lambda frame: type(frame).__name__,
)
def test_other_frames_are_left_to_pamqp(frame: Any) -> None:
    assert decode_frame(marshal(frame)) is None


def test_a_second_property_flags_word_is_left_to_pamqp() -> None:
    payload = (60).to_bytes(2, "big") + bytes(2) + (0).to_bytes(8, "big") + b"\x00\x01\x00\x00"
    assert decode_frame(amqp_frames.frame(amqp_frames.FRAME_HEADER, 1, payload)) is None


def wire_frames() -> list[bytes]:
    properties = PROPERTIES(headers=CALL_HEADERS, delivery_mode=2, message_id="acme:c-1:end")
    return [
        marshal(commands.Basic.Deliver("ctag", 7, False, "acme.webhooks", "roistat.call.end")),
        marshal(header.ContentHeader(0, 42, properties)),
        marshal(body.ContentBody(b'{"id": "c-1"}')),
        marshal(commands.Basic.Ack(7, multiple=True)),
    ]


@pytest.mark.parametrize("seed", range(50))
def test_damaged_frames_are_left_to_pamqp_or_read_as_pamqp_reads_them(seed: int) -> None:
    """Truncated, lengthened, or with bytes changed: never a frame pamqp would not make."""
    rng = random.Random(seed)
    for data in wire_frames():
        damaged = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        for variant in (bytes(damaged), data[: rng.randrange(len(data))], data + b"\xce"):
            ours = decode_frame(variant)
            if ours is None:
                continue
            try:
                theirs = pamqp_frame.unmarshal(variant)
            except Exception:  # pamqp refuses it: so must we have
                pytest.fail(f"decoded a frame pamqp refuses: {variant!r}")
            assert (ours[0], ours[1], as_fields(ours[2])) == (
                theirs[0],
                theirs[1],
                as_fields(theirs[2]),
            )


def test_a_frame_without_its_end_octet_is_left_to_pamqp() -> None:
    data = marshal(body.ContentBody(b"abc"))
    assert decode_frame(data[:-1] + b"\x00") is None
