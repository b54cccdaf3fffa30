"""Publishes written below aiormq's `basic_publish`: a round of messages gets consecutive
delivery tags in aiormq's channel, as `basic_publish` would give them, and goes to the
connection's writer as one piece, so that aiormq's reader still settles each confirm and
return. The frames come from `infra.amqp_frames`; `ConfirmedPublisher` forms the rounds.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

# What `write_round` uses of aiormq's `Channel` besides its public methods.
CHANNEL_STATE = (
    "delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue",
    "max_content_size", "lock", "number", "create_future",
)  # fmt: skip


def can_write_frames(channel: aiormq.Channel) -> bool:
    return channel.publisher_confirms and all(hasattr(channel, name) for name in CHANNEL_STATE)


class Outgoing:
    """One message's frames, waiting for its round and then for its confirm."""

    __slots__ = ("channel", "confirmation", "deadline", "expired", "frames", "message_id")

    def __init__(
        self, channel: aiormq.Channel, frames: bytes, message_id: str, timeout_s: float
    ) -> None:
        self.channel = channel
        self.frames = frames
        self.message_id = message_id
        self.deadline = asyncio.get_running_loop().time() + timeout_s  # loop time
        # A future of the channel's: aiormq fails it with the reason when the channel closes.
        self.confirmation: asyncio.Future[Any] = channel.create_future()
        self.expired = False

    def expire(self) -> None:
        # Cancelled, not failed: aiormq drops a late confirm of a cancelled publish quietly.
        if not self.confirmation.done():
            self.expired = True
            self.confirmation.cancel()


async def write_round(channel: aiormq.Channel, messages: list[Outgoing]) -> None:
    """Give the messages consecutive delivery tags in the channel, as its `basic_publish`
    would, and hand their frames to the connection's writer in one piece. Waiting for the
    channel's lock or for room in the writer's queue (a connection whose writer has died
    never makes room) ends when the last of their publishers stops waiting: the round
    fails and gives its tags back, and the rounds after it still go."""
    if not messages:
        return
    try:
        deadline = max(message.deadline for message in messages)
        async with asyncio.timeout_at(deadline), channel.lock:  # the lock raises once closed
            # Expired while waiting here: their publishers were told they failed; not sent.
            messages = [m for m in messages if not m.confirmation.done()]
            if not messages:
                return
            before = channel.delivery_tag
            for message in messages:
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                channel.confirmations[tag] = message.confirmation
                channel.message_id_delivery_tag[message.message_id] = tag
            frame = ChannelFrame(payload=b"".join(m.frames for m in messages), should_close=False)
            try:
                await channel.write_queue.put(frame)
            except BaseException:
                # Not written: the broker has not seen these tags; give them back.
                for tag in range(before + 1, channel.delivery_tag + 1):
                    channel.confirmations.pop(tag, None)
                for message in messages:
                    channel.message_id_delivery_tag.pop(message.message_id, None)
                channel.delivery_tag = before
                raise
            for tag, message in enumerate(messages, start=before + 1):
                message.confirmation.add_done_callback(
                    functools.partial(_forget_message_id, channel, message.message_id, tag)
                )
    except Exception as exc:
        for message in messages:
            if not message.confirmation.done():
                message.confirmation.set_exception(exc)


def _forget_message_id(
    channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[Any]
) -> None:
    # aiormq finds a returned message's publish by its id while it is unconfirmed.
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]
