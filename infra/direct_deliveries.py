"""Deliveries to a consumer taken out of the frame stream, before aiormq's channel sees them.

aiormq passes each frame of a delivery through its channel's queue, assembles the message in
the channel's reader task, and runs the consumer's callback in a task of its own: ~40 µs a
delivery, a seventh of a worker's CPU. A consumer that routes its consumer tag here
(`route`) is called straight from the connection's frame receiver instead
(`infra.frame_reader`), with each delivery as soon as its last frame is read, in order.

A routed delivery's frames are the receiver's alone: aiormq sees every other frame, and the
receiver tells it the connection lives (see `BulkFrameReceiver`). A consumer's tag is unique
in the process (it is made with a random part), so one table serves every connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import uuid4

from pamqp import body, commands, header

log = logging.getLogger(__name__)

# A whole delivery: its method frame, its properties and its body.
OnContent = Callable[[commands.Basic.Deliver, commands.Basic.Properties, bytes], None]

_routes: dict[str, tuple[int, OnContent]] = {}  # consumer tag -> (channel number, callback)


def new_consumer_tag(channel_number: int) -> str:
    return f"callpipe.{channel_number}.{uuid4().hex}"


def route(consumer_tag: str, channel_number: int, on_content: OnContent) -> None:
    """Hand the deliveries of `consumer_tag` on channel `channel_number` to `on_content` (which
    must not block) from now on, on every connection whose frames a `DeliveryTaker` reads."""
    _routes[consumer_tag] = (channel_number, on_content)


def unroute(consumer_tag: str) -> None:
    _routes.pop(consumer_tag, None)


def is_routed(consumer_tag: str) -> bool:
    return consumer_tag in _routes


@dataclass(eq=False)
class _Content:
    """A routed delivery whose content frames are still to come."""

    on_content: OnContent
    deliver: commands.Basic.Deliver
    properties: commands.Basic.Properties | None = None
    body_size: int = 0
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


class DeliveryTaker:
    """The routed deliveries of one connection, taken frame by frame."""

    def __init__(self) -> None:
        self._content: dict[int, _Content] = {}  # by channel number

    def take(self, channel: int, frame: object) -> bool:
        """Whether `frame`, decoded from channel `channel`, belongs to a routed delivery (and
        is taken: the delivery goes to its consumer once it is whole)."""
        content = self._content.get(channel)
        if content is None:
            if type(frame) is commands.Basic.Deliver:
                routed = _routes.get(frame.consumer_tag or "")
                if routed is not None and routed[0] == channel:
                    self._content[channel] = _Content(routed[1], frame)
                    return True
            return False
        if type(frame) is header.ContentHeader and content.properties is None:
            content.properties, content.body_size = frame.properties, frame.body_size
        elif type(frame) is body.ContentBody and content.properties is not None:
            content.parts.append(frame.value)
            content.received += len(frame.value)
        else:
            # The broker broke the protocol (a delivery's content frames come in one run on
            # its channel). The delivery stays unacked, and comes again when the channel ends.
            del self._content[channel]
            log.error(
                "channel %d: %s came inside a delivery's content (a protocol error); the "
                "delivery is left unacked",
                channel,
                type(frame).__name__,
            )
            return False
        if content.received >= content.body_size:
            del self._content[channel]
            whole = content.parts[0] if len(content.parts) == 1 else b"".join(content.parts)
            try:
                content.on_content(content.deliver, content.properties, whole)
            except Exception:
                # As aiormq does with a consumer task that fails: said, and reading goes on.
                log.exception("consumer callback failed")
        return True
