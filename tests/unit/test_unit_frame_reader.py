"""Frames cut out of what the socket gave, in any pieces: the same frames and errors as
aiormq's own receiver (frames made and read back with pamqp, aiormq's codec)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiormq.connection
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import body, commands, header, heartbeat
from pamqp import frame as pamqp_frame

from infra import broker, frame_reader
from infra.frame_reader import BulkFrameReceiver, frame_end

BIG = bytes(range(256)) * 1300  # 332,800 bytes: more than one read


def frames_on_the_wire() -> list[tuple[int, Any]]:
    properties = commands.Basic.Properties(
        message_id="acme:c-1:end", headers={"x-callpipe-project": "acme"}, delivery_mode=2
    )
    return [
        (0, heartbeat.Heartbeat()),
        (1, commands.Basic.Deliver("ctag", 1, False, "acme.webhooks", "roistat.call.end")),
        (1, header.ContentHeader(0, len(b'{"id": "c-1"}'), properties)),
        (1, body.ContentBody(b'{"id": "c-1"}')),
        (2, commands.Basic.Ack(7, multiple=True)),
        (1, body.ContentBody(BIG)),
    ]


def wire(frames: list[tuple[int, Any]]) -> bytes:
    return b"".join(pamqp_frame.marshal(frame, channel) for channel, frame in frames)


def fed_in_pieces(data: bytes, sizes: list[int], *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=2**20)
    start = 0
    for size in sizes:
        reader.feed_data(data[start : start + size])
        start += size
    reader.feed_data(data[start:])
    if eof:
        reader.feed_eof()
    return reader


class RecordingReader(asyncio.StreamReader):
    """A stream reader that notes how many bytes each read returned."""

    def __init__(self) -> None:
        super().__init__(limit=2**20)
        self.reads: list[int] = []
        self.was_read = asyncio.Event()

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.reads.append(len(data))
        self.was_read.set()
        return data


async def arriving_in_pieces(data: bytes, sizes: list[int]) -> RecordingReader:
    """The bytes arrive piece by piece, each one read before the next comes (as from a
    socket that delivers them apart), then the rest with the end of the stream."""
    reader = RecordingReader()
    pieces, start = [], 0
    for size in sizes:
        pieces.append(data[start : start + size])
        start += size

    async def feed() -> None:
        for piece in pieces:
            reader.was_read.clear()
            reader.feed_data(piece)
            await reader.was_read.wait()  # the receiver has read this piece
        reader.feed_data(data[start:])
        reader.feed_eof()

    task = asyncio.create_task(feed())
    FEEDERS.add(task)
    task.add_done_callback(FEEDERS.discard)
    return reader


FEEDERS: set[asyncio.Task[None]] = set()


def described(frames: list[tuple[int, Any]]) -> list[tuple[int, str, bytes]]:
    """Comparable: channel, frame name, and the frame encoded again by pamqp."""
    return [(channel, frame.name, pamqp_frame.marshal(frame, channel)) for channel, frame in frames]


def test_frame_end_waits_for_the_head_then_the_payload_and_end_octet() -> None:
    one = pamqp_frame.marshal(commands.Basic.Ack(1), 1)
    assert frame_end(b"", 0) is None
    assert frame_end(one[:6], 0) is None  # the head is 7 bytes
    assert frame_end(one[:-1], 0) is None  # the end octet is still to come
    assert frame_end(one, 0) == len(one)
    assert frame_end(one + one[:3], len(one)) is None
    assert frame_end(one + one, len(one)) == 2 * len(one)


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # everything at once
        [1] * 40,  # a byte at a time, then the rest
        [7, 1, 30, 8, 200000],  # cut inside heads, payloads and the big body
        "random",
    ],
)
async def test_the_frames_come_out_as_pamqp_reads_them_however_the_bytes_arrive(
    sizes: list[int] | str,
) -> None:
    sent = frames_on_the_wire()
    data = wire(sent)
    if isinstance(sizes, str):  # "random"
        sizes = [random.Random(7).randint(1, 5000) for _ in range(100)]
    reader = await arriving_in_pieces(data, sizes)
    receiver = BulkFrameReceiver(reader)

    received = []
    for _ in sent:
        consumed, channel, frame = await receiver.get_frame()
        assert consumed > 0
        received.append((channel, frame))

    assert described(received) == described(sent)
    with pytest.raises(StopAsyncIteration):  # the connection ended between two frames
        await receiver.get_frame()
    assert reader.reads[: len(sizes)] == sizes  # each piece was read on its own


async def test_the_receiver_iterates_as_aiormq_reads_it() -> None:
    sent = frames_on_the_wire()
    reader = await arriving_in_pieces(wire(sent), [3, 3, 3])
    received = [(channel, frame) async for _, channel, frame in BulkFrameReceiver(reader)]
    assert described(received) == described(sent)
    assert reader.reads[:3] == [3, 3, 3]


async def test_a_connection_that_ends_inside_a_frame_is_a_connection_error() -> None:
    data = wire(frames_on_the_wire())
    receiver = BulkFrameReceiver(fed_in_pieces(data[:20], []))
    await receiver.get_frame()  # the heartbeat (8 bytes) is whole
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await receiver.get_frame()


async def test_a_frame_without_its_end_octet_is_an_invalid_frame() -> None:
    broken = bytearray(pamqp_frame.marshal(commands.Basic.Ack(1), 1))
    broken[-1] = 0
    receiver = BulkFrameReceiver(fed_in_pieces(bytes(broken), []))
    with pytest.raises(InvalidFrameError):
        await receiver.get_frame()


async def test_a_broker_refusing_the_protocol_is_a_protocol_error() -> None:
    receiver = BulkFrameReceiver(fed_in_pieces(b"AMQP\x00\x00\x09\x01", []))
    with pytest.raises(ProtocolSyntaxError):
        await receiver.get_frame()


async def test_a_read_that_fails_is_a_connection_error() -> None:
    reader = asyncio.StreamReader()
    reader.set_exception(ConnectionResetError("reset by peer"))
    with pytest.raises(AMQPConnectionError, match="reset by peer"):
        await BulkFrameReceiver(reader).get_frame()


def test_install_replaces_aiormqs_receiver_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", frame_reader.AIORMQ_RECEIVER)
    assert frame_reader.install() is True
    assert aiormq.connection.FrameReceiver is BulkFrameReceiver
    assert frame_reader.install() is True  # again: nothing more to do
    assert aiormq.connection.FrameReceiver is BulkFrameReceiver


def test_install_leaves_an_aiormq_of_another_shape_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class ReceiverOfAnotherVersion:
        pass

    monkeypatch.setattr(aiormq.connection, "FrameReceiver", ReceiverOfAnotherVersion)
    assert frame_reader.install() is False
    kept: object = aiormq.connection.FrameReceiver
    assert kept is ReceiverOfAnotherVersion


def test_connect_says_once_when_frames_are_read_aiormqs_way(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class ReceiverOfAnotherVersion:
        pass

    monkeypatch.setattr(aiormq.connection, "FrameReceiver", ReceiverOfAnotherVersion)
    broker._read_frames_in_bulk.cache_clear()
    try:
        assert broker._read_frames_in_bulk() is False
        assert broker._read_frames_in_bulk() is False  # asked once per process
    finally:
        broker._read_frames_in_bulk.cache_clear()  # the next connect installs it again
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "aiormq" in r.message]
    assert len(warnings) == 1
