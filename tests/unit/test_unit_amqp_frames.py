"""The publish frames callpipe encodes itself, read back with pamqp (aiormq's own decoder)."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands, header
from pamqp import frame as pamqp_frame

from infra import amqp_frames


def read_frames(data: bytes) -> list[tuple[int, Any]]:
    """(channel, frame) for every frame in `data`, which must hold whole frames only."""
    frames = []
    while data:
        consumed, channel, decoded = pamqp_frame.unmarshal(data)
        frames.append((channel, decoded))
        data = data[consumed:]
    return frames


def test_the_method_frame_is_a_basic_publish_of_the_route() -> None:
    [(channel, method)] = read_frames(
        amqp_frames.publish_method_frame(7, "acme.webhooks", "roistat.call.start", True)
    )
    assert channel == 7
    assert isinstance(method, commands.Basic.Publish)
    assert (method.exchange, method.routing_key) == ("acme.webhooks", "roistat.call.start")
    assert method.mandatory is True and method.immediate is False


def test_not_mandatory_clears_the_bit() -> None:
    [(_, method)] = read_frames(amqp_frames.publish_method_frame(1, "", "q", False))
    assert method.mandatory is False and method.exchange == ""


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"x-callpipe-project": "acme", "x-callpipe-remote-addr": "", "x-note": "привет"},
        {"x-attempt": 3, "x-flag": True, "x-text": "t"},  # not all text: pamqp encodes them
    ],
)
def test_the_content_header_carries_every_property(headers: dict[str, Any] | None) -> None:
    body = b'{"id": "c-1"}'
    frames = read_frames(
        amqp_frames.content_frames(
            3,
            body,
            content_type="application/json",
            delivery_mode=2,
            message_id="acme:c-1:start",
            headers=headers,
            max_body_frame=131064,
        )
    )
    assert [channel for channel, _ in frames] == [3, 3]
    [(_, content_header), (_, content_body)] = frames
    assert isinstance(content_header, header.ContentHeader)
    assert content_header.body_size == len(body)
    properties = content_header.properties
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.message_id == "acme:c-1:start"
    assert (properties.headers or None) == (headers or None)
    assert properties.correlation_id is None and properties.expiration is None
    assert isinstance(content_body, pamqp_body.ContentBody)
    assert content_body.value == body


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 250, 1000])
def test_a_body_is_split_into_frames_of_at_most_the_limit(size: int) -> None:
    body = bytes(range(256)) * 4
    body = body[:size]
    frames = read_frames(
        amqp_frames.content_frames(
            1,
            body,
            content_type="application/json",
            delivery_mode=2,
            message_id="m",
            headers=None,
            max_body_frame=100,
        )
    )
    content_header = frames[0][1]
    assert content_header.body_size == size
    parts = [decoded.value for _, decoded in frames[1:]]
    assert all(0 < len(part) <= 100 for part in parts)
    assert b"".join(parts) == body
    assert len(parts) == -(-size // 100)


def test_a_name_over_255_bytes_is_refused_with_a_clear_error() -> None:
    with pytest.raises(amqp_frames.FrameEncodingError, match="255 bytes"):
        amqp_frames.publish_method_frame(1, "x" * 256, "k", True)
    with pytest.raises(amqp_frames.FrameEncodingError):
        amqp_frames.content_frames(
            1,
            b"{}",
            content_type="application/json",
            delivery_mode=2,
            message_id="é" * 128,
            headers=None,
            max_body_frame=100,
        )
