"""AMQP 0-9-1 frames of a `basic.publish`, encoded in a few byte operations (pure, no I/O).

aiormq builds three pamqp objects per publish and marshals each field through a generic
encoder; the confirmed publisher sends thousands of messages a second with the same
exchange, routing key and property set, so it encodes them here instead: the method frame
of a route is built once, the content header from one fixed layout. The layout follows the
AMQP 0-9-1 specification (section 4.2, and the `basic` class's property list); the unit
tests decode the bytes with pamqp, the decoder aiormq itself uses.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pamqp import encode as pamqp_encode

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"
FRAME_OVERHEAD = 8  # type, channel, size before the payload; the end octet after it

BASIC_CLASS = 60
BASIC_PUBLISH = 40

# Property flags of the `basic` content header, highest bit first (AMQP 0-9-1 4.2.6.1).
FLAG_CONTENT_TYPE = 1 << 15
FLAG_HEADERS = 1 << 13
FLAG_DELIVERY_MODE = 1 << 12
FLAG_MESSAGE_ID = 1 << 7

_FRAME_START = struct.Struct(">BHI")
_HEADER_START = struct.Struct(">HHQH")
_LONG = struct.Struct(">I")


class FrameEncodingError(ValueError):
    """A field does not fit the AMQP wire format (e.g. a short string over 255 bytes)."""


def short_string(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise FrameEncodingError(f"{value[:40]!r}... is over 255 bytes, an AMQP short string")
    return bytes((len(raw),)) + raw


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_START.pack(kind, channel, len(payload)) + payload + FRAME_END


def publish_method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The whole `basic.publish` method frame of one route (callers keep it)."""
    payload = (
        struct.pack(">HHH", BASIC_CLASS, BASIC_PUBLISH, 0)  # the last: reserved-1 (ticket)
        + short_string(exchange)
        + short_string(routing_key)
        + bytes((1 if mandatory else 0,))  # bit 0 mandatory, bit 1 immediate (never)
    )
    return frame(FRAME_METHOD, channel, payload)


def field_table(values: Mapping[str, Any]) -> bytes:
    """An AMQP field table: text values as long strings ('S'); anything else through pamqp's
    encoder, which knows every field type RabbitMQ accepts."""
    if not all(isinstance(value, str) for value in values.values()):
        return pamqp_encode.field_table(dict(values))
    entries = b"".join(
        short_string(key) + b"S" + _LONG.pack(len(raw)) + raw
        for key, raw in ((key, value.encode("utf-8")) for key, value in values.items())
    )
    return _LONG.pack(len(entries)) + entries


def content_frames(
    channel: int,
    body: bytes,
    *,
    content_type: str,
    delivery_mode: int,
    message_id: str,
    headers: Mapping[str, Any] | None,
    max_body_frame: int,
) -> bytes:
    """The content header frame and the body frames (each at most `max_body_frame` bytes
    of body) of one message."""
    flags = FLAG_CONTENT_TYPE | FLAG_DELIVERY_MODE | FLAG_MESSAGE_ID
    properties = [short_string(content_type)]
    if headers:
        flags |= FLAG_HEADERS
        properties.append(field_table(headers))
    properties.append(bytes((delivery_mode,)))
    properties.append(short_string(message_id))
    header_payload = _HEADER_START.pack(BASIC_CLASS, 0, len(body), flags) + b"".join(properties)
    parts = [frame(FRAME_HEADER, channel, header_payload)]
    if len(body) <= max_body_frame:
        if body:
            parts.append(frame(FRAME_BODY, channel, body))
    else:
        view = memoryview(body)
        for start in range(0, len(body), max_body_frame):
            parts.append(frame(FRAME_BODY, channel, bytes(view[start : start + max_body_frame])))
    return b"".join(parts)
