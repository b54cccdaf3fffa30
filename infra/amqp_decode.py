"""The frames a consumer receives most, decoded in a few byte operations (pure, no I/O).

A worker receives four frames a webhook: the delivery's `basic.deliver`, content header and
body, and (about) one `basic.ack` of its event's confirm. pamqp decodes every field through a
generic decoder, which was a tenth of a worker's CPU. `decode_frame` reads those four kinds
by their fixed layouts (AMQP 0-9-1 section 4.2, and the `basic` class's methods and property
list) into the same pamqp objects pamqp's `frame.unmarshal` builds, so aiormq above sees no
difference; anything else, or anything it does not read exactly so (a malformed frame, a
second property-flags word), is left to pamqp (None), which also raises pamqp's errors. The
unit tests hold both decoders equal, frame by frame.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import body as pamqp_body
from pamqp import commands, header
from pamqp import decode as pamqp_decode
from pamqp.base import Frame as MethodFrame

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = 0xCE

BASIC_CLASS = 60
BASIC_DELIVER = 60
BASIC_ACK = 80

_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_METHOD_ID = struct.Struct(">HH")  # class, method
_LONGLONG = struct.Struct(">q")  # signed, as pamqp reads a longlong
_LONG = struct.Struct(">I")
_HEADER_START = struct.Struct(">HHQH")  # class, weight, body size, property flags

# The `basic` properties in wire order, with their flag bits (AMQP 0-9-1 4.2.6.1) and how
# each is read: "s" a short string, "t" a field table, "o" an octet. The timestamp is left
# to pamqp (it turns it into a datetime its own way); no frame of ours carries one.
_PROPERTIES: tuple[tuple[str, int, str], ...] = (
    ("content_type", 1 << 15, "s"),
    ("content_encoding", 1 << 14, "s"),
    ("headers", 1 << 13, "t"),
    ("delivery_mode", 1 << 12, "o"),
    ("priority", 1 << 11, "o"),
    ("correlation_id", 1 << 10, "s"),
    ("reply_to", 1 << 9, "s"),
    ("expiration", 1 << 8, "s"),
    ("message_id", 1 << 7, "s"),
    ("message_type", 1 << 5, "s"),
    ("user_id", 1 << 4, "s"),
    ("app_id", 1 << 3, "s"),
    ("cluster_id", 1 << 2, "s"),
)
_LEFT_TO_PAMQP = 1 << 6 | 1  # a timestamp; another flags word follows
_DEFAULTS: dict[str, Any] = {name: None for name, _, _ in _PROPERTIES}
_DEFAULTS.update(timestamp=None, cluster_id="")  # as `Basic.Properties()` sets them

Decoded = tuple[int, int, MethodFrame | header.ContentHeader | pamqp_body.ContentBody]


class _NotExactly(Exception):
    """The frame is not one this module reads exactly as pamqp does: pamqp decodes it."""


def decode_frame(data: bytes) -> Decoded | None:
    """(bytes used, channel, frame) of one whole frame, as `pamqp.frame.unmarshal` returns
    them; None when pamqp should decode it (any other kind, or anything unusual)."""
    try:
        return _decode(data)
    except (_NotExactly, struct.error, IndexError, UnicodeDecodeError):
        return None


def _decode(data: bytes) -> Decoded | None:
    kind, channel, size = _FRAME_HEAD.unpack_from(data)
    end = _FRAME_HEAD.size + size
    if size == 0 or len(data) != end + 1 or data[end] != FRAME_END:
        return None
    start = _FRAME_HEAD.size
    if kind == FRAME_BODY:
        return end + 1, channel, pamqp_body.ContentBody(data[start:end])
    if kind == FRAME_HEADER:
        return end + 1, channel, _content_header(data, start, end)
    if kind != FRAME_METHOD:
        return None
    class_id, method_id = _METHOD_ID.unpack_from(data, start)
    if class_id != BASIC_CLASS:
        return None
    if method_id == BASIC_DELIVER:
        return end + 1, channel, _deliver(data, start + _METHOD_ID.size, end)
    if method_id == BASIC_ACK:
        return end + 1, channel, _ack(data, start + _METHOD_ID.size, end)
    return None


def _deliver(data: bytes, offset: int, end: int) -> commands.Basic.Deliver:
    consumer_tag, offset = _short_string(data, offset)
    (delivery_tag,) = _LONGLONG.unpack_from(data, offset)
    redelivered = bool(data[offset + 8] & 1)
    exchange, offset = _short_string(data, offset + 9)
    routing_key, offset = _short_string(data, offset)
    _check_within(offset, end)
    frame = commands.Basic.Deliver.__new__(commands.Basic.Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = redelivered
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _ack(data: bytes, offset: int, end: int) -> commands.Basic.Ack:
    (delivery_tag,) = _LONGLONG.unpack_from(data, offset)
    multiple = bool(data[offset + 8] & 1)
    _check_within(offset + 9, end)
    frame = commands.Basic.Ack.__new__(commands.Basic.Ack)
    frame.delivery_tag = delivery_tag
    frame.multiple = multiple
    return frame


def _content_header(data: bytes, offset: int, end: int) -> header.ContentHeader:
    class_id, weight, body_size, flags = _HEADER_START.unpack_from(data, offset)
    if flags & _LEFT_TO_PAMQP:
        raise _NotExactly
    offset += _HEADER_START.size
    properties = commands.Basic.Properties.__new__(commands.Basic.Properties)
    for name, default in _DEFAULTS.items():
        setattr(properties, name, default)
    value: Any
    for name, flag, kind in _PROPERTIES:
        if flags & flag:
            if kind == "s":
                value, offset = _short_string(data, offset)
            elif kind == "t":
                value, offset = _field_table(data, offset)
            else:
                value = data[offset]
                offset += 1
            setattr(properties, name, value)
    _check_within(offset, end)
    content_header = header.ContentHeader(weight, body_size, properties)
    content_header.class_id = class_id
    return content_header


def _short_string(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    start = offset + 1
    return data[start : start + length].decode("utf-8"), start + length


def _field_table(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    """A field table: long strings ('S') read here, any other value by pamqp's decoder."""
    (length,) = _LONG.unpack_from(data, offset)
    offset += _LONG.size
    table_end = offset + length
    table: dict[str, Any] = {}
    while offset < table_end:
        key, offset = _short_string(data, offset)
        if data[offset] == 0x53:  # 'S'
            (size,) = _LONG.unpack_from(data, offset + 1)
            start = offset + 1 + _LONG.size
            raw = data[start : start + size]
            offset = start + size
            try:
                table[key] = raw.decode("utf-8")
            except UnicodeDecodeError:
                table[key] = raw  # as pamqp: bytes that are not text stay bytes
        else:
            try:
                used, table[key] = pamqp_decode.embedded_value(data[offset:table_end])
            except ValueError as exc:
                raise _NotExactly from exc
            offset += used
    _check_within(offset, table_end)
    return table, offset


def _check_within(offset: int, end: int) -> None:
    if offset > end:
        raise _NotExactly
