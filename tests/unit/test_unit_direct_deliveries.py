"""Deliveries to a routed consumer, taken from the frames as the connection reads them: whole,
in order, and nothing else taken from aiormq (frames made with pamqp, aiormq's codec)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pamqp import body, commands, header, heartbeat
from pamqp import frame as pamqp_frame

from infra import direct_deliveries
from infra.frame_reader import SIGN_OF_LIFE, BulkFrameReceiver

TAG = "callpipe.1.test"
Taken = tuple[str | None, int | None, dict[str, Any] | None, bytes]


class Consumer:
    """A routed consumer that notes each delivery it is handed."""

    def __init__(self) -> None:
        self.deliveries: list[Taken] = []

    def __call__(
        self, deliver: commands.Basic.Deliver, properties: commands.Basic.Properties, data: bytes
    ) -> None:
        self.deliveries.append(
            (properties.message_id, deliver.delivery_tag, properties.headers, data)
        )


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    routed = Consumer()
    direct_deliveries.route(TAG, 1, routed)
    try:
        yield routed
    finally:
        direct_deliveries.unroute(TAG)


def delivery(tag: int, data: bytes, *, consumer_tag: str = TAG, frame_max: int = 0) -> list[Any]:
    """The frames of one delivery: method, content header, body (in pieces of `frame_max`)."""
    properties = commands.Basic.Properties(
        message_id=f"m-{tag}", headers={"x-callpipe-project": "acme"}, delivery_mode=2
    )
    step = frame_max or max(len(data), 1)
    pieces = [body.ContentBody(data[i : i + step]) for i in range(0, len(data), step)]
    return [
        commands.Basic.Deliver(consumer_tag, tag, False, "acme.webhooks", "roistat.call.end"),
        header.ContentHeader(0, len(data), properties),
        *pieces,
    ]


def taker_run(frames: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], Any]:
    """Feed (channel, frame) to a taker: the frames it left to aiormq."""
    taker = direct_deliveries.DeliveryTaker()
    return [(channel, frame) for channel, frame in frames if not taker.take(channel, frame)], taker


def test_a_routed_delivery_is_handed_over_whole_once_its_body_is_in(consumer: Consumer) -> None:
    frames = [(1, frame) for frame in delivery(7, b"0123456789", frame_max=4)]
    taker = direct_deliveries.DeliveryTaker()
    for channel, frame in frames[:-1]:
        assert taker.take(channel, frame)
        assert consumer.deliveries == []  # not whole yet
    assert taker.take(*frames[-1])
    assert consumer.deliveries == [("m-7", 7, {"x-callpipe-project": "acme"}, b"0123456789")]


def test_an_empty_body_is_whole_with_its_header(consumer: Consumer) -> None:
    left, _ = taker_run([(1, frame) for frame in delivery(3, b"")])
    assert left == []
    assert consumer.deliveries == [("m-3", 3, {"x-callpipe-project": "acme"}, b"")]


def test_other_consumers_channels_and_frames_are_left_to_aiormq(consumer: Consumer) -> None:
    others = [
        *[(1, frame) for frame in delivery(1, b"x", consumer_tag="someone-else")],
        *[(2, frame) for frame in delivery(2, b"y")],  # the routed tag, on another channel
        (1, commands.Basic.Ack(5, multiple=True)),
        (0, heartbeat.Heartbeat()),
    ]
    left, _ = taker_run(others)
    assert left == others
    assert consumer.deliveries == []


def test_frames_of_other_channels_may_come_between_a_delivery_s_frames(
    consumer: Consumer,
) -> None:
    first, second = delivery(1, b"ab", frame_max=1), delivery(2, b"c")
    ack = (2, commands.Basic.Ack(9))
    frames = [(1, first[0]), ack, (1, first[1]), ack, (1, first[2]), ack, (1, first[3])]
    frames += [(1, frame) for frame in second]
    left, _ = taker_run(frames)
    assert left == [ack, ack, ack]
    assert [taken[1] for taken in consumer.deliveries] == [1, 2]  # in order


def test_a_frame_that_breaks_a_delivery_s_content_goes_to_aiormq_and_is_said(
    consumer: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    deliver, content_header, _ = delivery(1, b"ab")
    intruder = commands.Basic.Ack(4)
    left, taker = taker_run([(1, deliver), (1, content_header), (1, intruder)])
    assert left == [(1, intruder)]
    assert consumer.deliveries == []
    assert "came inside a delivery's content" in caplog.text
    # The channel reads on: the next delivery is taken whole.
    for frame in delivery(2, b"z"):
        assert taker.take(1, frame)
    assert [taken[1] for taken in consumer.deliveries] == [2]


def test_a_consumer_that_fails_is_said_and_the_next_delivery_still_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[int | None] = []

    def failing(deliver: commands.Basic.Deliver, *_: Any) -> None:
        seen.append(deliver.delivery_tag)
        if deliver.delivery_tag == 1:
            raise RuntimeError("boom")

    direct_deliveries.route(TAG, 1, failing)
    try:
        with caplog.at_level(logging.ERROR):
            left, _ = taker_run([(1, frame) for frame in delivery(1, b"a") + delivery(2, b"b")])
    finally:
        direct_deliveries.unroute(TAG)
    assert left == []
    assert seen == [1, 2]
    assert "consumer callback failed" in caplog.text


def test_an_unrouted_tag_goes_back_to_aiormq(consumer: Consumer) -> None:
    direct_deliveries.unroute(TAG)
    frames = [(1, frame) for frame in delivery(1, b"a")]
    left, _ = taker_run(frames)
    assert left == frames


def test_consumer_tags_are_unique_and_name_their_channel() -> None:
    tags = {direct_deliveries.new_consumer_tag(3) for _ in range(100)}
    assert len(tags) == 100
    assert all(tag.startswith("callpipe.3.") for tag in tags)


async def test_the_receiver_tells_aiormq_of_taken_frames_with_one_sign_of_life(
    consumer: Consumer,
) -> None:
    """A run of taken frames reaches aiormq as one heartbeat (its stuck-connection check
    needs to hear from the connection); the frames after it come as they are."""
    ack = commands.Basic.Ack(5, multiple=True)
    frames = [(1, frame) for frame in delivery(1, b"a") + delivery(2, b"b")] + [(1, ack)]
    reader = asyncio.StreamReader()
    receiver = BulkFrameReceiver(reader)
    reader.feed_data(b"".join(pamqp_frame.marshal(frame, channel) for channel, frame in frames[:6]))
    async with asyncio.timeout(5):  # not waiting for more bytes first
        assert await receiver.get_frame() == SIGN_OF_LIFE
    assert [taken[1] for taken in consumer.deliveries] == [1, 2]
    reader.feed_data(pamqp_frame.marshal(ack, 1))
    reader.feed_eof()
    _, channel, frame = await receiver.get_frame()
    assert isinstance(frame, commands.Basic.Ack)
    assert (channel, frame.delivery_tag) == (1, 5)
    with pytest.raises(StopAsyncIteration):
        await receiver.get_frame()
