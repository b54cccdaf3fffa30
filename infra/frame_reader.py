"""Frames read from the broker in bulk, below aiormq's connection.

aiormq's own receiver reads each frame with three `readexactly` calls into a `BytesIO`, under
a lock. A worker reads four frames a webhook (the delivery's method, header and body, and
its event's confirm), and that reading was a tenth of its CPU. `BulkFrameReceiver` takes
what the socket has, up to `READ_SIZE` bytes at a time, and cuts the frames out of it.

`install()` puts it where aiormq's `Connection.connect` looks for its receiver (the module
global `aiormq.connection.FrameReceiver`), for every connection the process opens from then
on, reconnects included. Where the installed aiormq is not shaped as expected, aiormq keeps
its own receiver and `install()` says so.

The frames a consumer receives most (a delivery's three, and publish confirms) are decoded by
`infra.amqp_decode` into the same pamqp objects; pamqp decodes the rest, as in aiormq. The
frames of deliveries to a routed consumer go to it (`infra.direct_deliveries`), not to aiormq.
"""

from __future__ import annotations

import asyncio
import struct

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import heartbeat
from pamqp.exceptions import PAMQPException

from infra.amqp_decode import decode_frame
from infra.direct_deliveries import DeliveryTaker

READ_SIZE = 256 * 1024
PROTOCOL_HEADER = b"AMQP"  # what a broker sends instead of a frame when it refuses the protocol
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size (AMQP 0-9-1 section 4.2.3)
_FRAME_OVERHEAD = _FRAME_HEAD.size + 1  # the head before the payload, the end octet after it
AIORMQ_RECEIVER = aiormq.connection.FrameReceiver  # the one this module was written against
SIGN_OF_LIFE: aiormq.connection.ReceivedFrame = (_FRAME_OVERHEAD, 0, heartbeat.Heartbeat())


def frame_end(buffer: bytes, start: int) -> int | None:
    """Where the frame that begins at `start` ends (exclusive); None while it is incomplete.
    Pure: whether the frame is well formed is pamqp's to say."""
    if len(buffer) - start < _FRAME_HEAD.size:
        return None
    _, _, size = _FRAME_HEAD.unpack_from(buffer, start)
    end = start + size + _FRAME_OVERHEAD
    return end if end <= len(buffer) else None


class BulkFrameReceiver(AIORMQ_RECEIVER):
    """aiormq's `FrameReceiver` with the same frames and errors, read in bulk; the frames of
    deliveries to a routed consumer (`infra.direct_deliveries`) go to it instead."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = b""
        self._start = 0  # where the next frame begins in `_buffer`
        self._deliveries = DeliveryTaker()

    async def get_frame(self) -> aiormq.connection.ReceivedFrame:
        took = False
        while True:
            end = frame_end(self._buffer, self._start)
            if end is None:
                if took:
                    # Frames came, all taken: aiormq hears of them as a heartbeat, the sign of
                    # life its stuck-connection check waits for, with nothing else to do.
                    return SIGN_OF_LIFE
                await self._read_more()
                continue
            frame = self._buffer[self._start : end]
            self._start = end
            self.started = True
            received = _unmarshal(frame)
            if not self._deliveries.take(received[1], received[2]):
                return received
            took = True

    async def _read_more(self) -> None:
        partial = self._buffer[self._start :]
        if not self.started and partial.startswith(PROTOCOL_HEADER):
            raise ProtocolSyntaxError("Unexpected AMQP protocol header")
        if not partial and self.reader.at_eof():
            raise StopAsyncIteration  # as aiormq's: the connection ended between frames
        try:
            chunk = await self.reader.read(READ_SIZE)
        except OSError as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        if not chunk:
            raise AMQPConnectionError(
                f"Server connection unexpectedly closed. Read {len(partial)} bytes of a frame"
            )
        self._buffer = partial + chunk
        self._start = 0


def _unmarshal(frame: bytes) -> aiormq.connection.ReceivedFrame:
    decoded = decode_frame(frame)
    if decoded is not None:
        return decoded
    try:
        return pamqp.frame.unmarshal(frame)
    except PAMQPException as exc:
        raise InvalidFrameError(str(exc)) from exc


def install() -> bool:
    """Read frames in bulk on every connection opened from now on; False where aiormq is not
    shaped as expected (it then reads them its own way)."""
    current = getattr(aiormq.connection, "FrameReceiver", None)
    if current is BulkFrameReceiver:
        return True
    if current is not AIORMQ_RECEIVER:  # replaced since, by someone else
        return False
    aiormq.connection.FrameReceiver = BulkFrameReceiver  # type: ignore[misc]
    return True
