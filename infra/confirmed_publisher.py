"""Confirmed publishing: one long-lived channel with publisher confirms, on which concurrent
publishes pipeline, each message's frames encoded once and written in rounds."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from infra import amqp_frames
from infra.publish_rounds import Outgoing, can_write_frames, write_round
from infra.refusals import RefusalWatch

log = logging.getLogger(__name__)

PERSISTENT = 2  # AMQP delivery mode: written to disk


class PublishFailedError(Exception):
    """The broker did not confirm the message: it may not be stored. Never answer 200."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One persistent message for `ConfirmedPublisher.publish_many`."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: Mapping[str, Any] | None = None
    mandatory: bool = True


class ConfirmedPublisher:
    """One long-lived channel with publisher confirms; concurrent publishes pipeline on it.

    The frames of each message are encoded once (`infra.amqp_frames`); the messages that
    callers hand over while the event loop is busy are written to the connection together,
    one write per round instead of one per message, under aiormq's channel lock, with their
    delivery tags registered in aiormq's channel so that its reader settles the confirms and
    returns as for its own publishes. Where the installed aiormq lacks what that needs, each
    message goes through aiormq's `basic_publish`. The channel is aio-pika's robust one, so
    it is reopened after a reconnect, and after the broker has refused everything on it for
    a while (`infra.refusals`).
    """

    def __init__(
        self, channel: AbstractChannel, timeout_s: float, refusals: RefusalWatch | None = None
    ) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        self._refusals = RefusalWatch() if refusals is None else refusals
        self._publishing: dict[str, asyncio.Future[None]] = {}  # message ids in flight
        self._method_frames: dict[tuple[int, str, str, bool], bytes] = {}
        self._outgoing: list[Outgoing] = []
        self._writer: asyncio.Task[None] | None = None
        # The channel got last, and whether its frames can be written directly
        # (`can_write_frames`, asked once per channel: a reconnect brings a new one).
        self._current: tuple[aiormq.Channel | None, bool] = (None, False)
        self._closing: asyncio.Task[Any] | None = None  # a refused channel, being closed

    @classmethod
    async def open(
        cls,
        connection: AbstractRobustConnection,
        timeout_s: float,
        refusals: RefusalWatch | None = None,
    ) -> ConfirmedPublisher:
        # on_return_raises: a returned (unroutable) mandatory message fails the publish.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, timeout_s, refusals)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        """Publish a persistent message and wait for the broker's confirm (at most
        `timeout_s`, default the publisher's), or raise `PublishFailedError`."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            if message_id in self._publishing:
                async with asyncio.timeout_at(deadline):
                    await self._wait_for_earlier(message_id)
            done = loop.create_future()
            self._publishing[message_id] = done
            try:
                channel = await self._underlay(deadline)
                left_s = deadline - loop.time()
                if not self._can_write_frames(channel):
                    await self._publish_through_aiormq(
                        channel, exchange, routing_key, body, message_id, headers, mandatory,
                        left_s,
                    )  # fmt: skip
                else:
                    publication = Publication(
                        exchange, routing_key, body, message_id, headers, mandatory
                    )
                    await self._send(self._outgoing_message(channel, publication, left_s))
                self._refusals.confirmed()
            finally:
                del self._publishing[message_id]
                done.set_result(None)
        except TimeoutError as exc:
            raise PublishFailedError(f"no confirm within {timeout_s:g}s") from exc
        except Exception as exc:
            if _is_nack(exc):
                self._note_refusal()
            raise PublishFailedError(f"{type(exc).__name__}: {exc}") from exc

    async def publish_many(
        self,
        publications: Sequence[Publication],
        timeout_s: float | None = None,
        confirmed: list[str] | None = None,
    ) -> list[PublishFailedError | None]:
        """Publish messages together and wait for all their confirms (at most `timeout_s`):
        per message None (confirmed) or why it failed. Same as a `publish` of each, gathered,
        without a task, a coroutine and a timer per message: the outbox relay's batches.

        `confirmed`, when given, gets the id of each message the broker confirmed, also when
        the caller is cancelled midway: the caller can still say which ones went out."""
        if not publications:
            return []
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            channel = await self._underlay(deadline)
        except TimeoutError:
            return [PublishFailedError(f"no confirm within {timeout_s:g}s") for _ in publications]
        except Exception as exc:
            return [PublishFailedError(f"{type(exc).__name__}: {exc}") for _ in publications]
        ids = [publication.message_id for publication in publications]
        if (
            not self._can_write_frames(channel)
            or len(set(ids)) < len(ids)
            or not self._publishing.keys().isdisjoint(ids)
        ):
            # aiormq's basic_publish, or an id already in flight (a resent webhook's event,
            # rare): one publish each.
            left_s = max(deadline - loop.time(), 0.0)
            return await self._publish_each(publications, left_s, confirmed)
        done = loop.create_future()
        self._publishing.update(dict.fromkeys(ids, done))
        try:
            left_s = deadline - loop.time()
            messages = [self._outgoing_message(channel, p, left_s) for p in publications]
            results = await self._send_all(messages, left_s, timeout_s, confirmed)
            for message in messages:
                if _was_confirmed(message):
                    self._refusals.confirmed()
                elif _was_refused(message):
                    self._note_refusal()
            return results
        except Exception as exc:
            return [PublishFailedError(f"{type(exc).__name__}: {exc}") for _ in publications]
        finally:
            for message_id in ids:
                del self._publishing[message_id]
            done.set_result(None)

    async def _publish_each(
        self, publications: Sequence[Publication], timeout_s: float, confirmed: list[str] | None
    ) -> list[PublishFailedError | None]:
        async def one(publication: Publication) -> PublishFailedError | None:
            try:
                await self.publish(
                    publication.exchange,
                    publication.routing_key,
                    publication.body,
                    message_id=publication.message_id,
                    headers=publication.headers,
                    mandatory=publication.mandatory,
                    timeout_s=timeout_s,
                )
            except PublishFailedError as exc:
                return exc
            if confirmed is not None:
                confirmed.append(publication.message_id)
            return None

        return list(await asyncio.gather(*(one(p) for p in publications)))

    def _note_refusal(self) -> None:
        """A nack; after many in a row, for a while, close the channel: aio-pika opens a new
        one, and the publishes waiting on this one fail (they were being refused anyway)."""
        channel = self._current[0]
        if not self._refusals.refused(time.monotonic()) or channel is None or channel.is_closed:
            return
        log.warning(
            "the broker refused every publish on channel %d for a while: opening a new one",
            channel.number,
        )
        self._closing = asyncio.get_running_loop().create_task(channel.close())

    def _can_write_frames(self, channel: aiormq.Channel) -> bool:
        """Whether frames can be written on `channel`, the one `_underlay` returned."""
        if channel is not self._current[0]:
            self._current = (channel, can_write_frames(channel))
        return self._current[1]

    async def _underlay(self, deadline: float) -> aiormq.Channel:
        """The channel to publish on; during a reconnect aio-pika waits for the connection
        there, so the wait ends at the publish's `deadline` (loop time)."""
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
        # While the channel got last is open, it is the one aio-pika would give: asking costs
        # a wait for the connection and a timer per publish (~4% of the ingress's CPU). A
        # reconnect closes it, and the channel that replaces it is asked for below.
        current = self._current[0]
        if current is not None and not current.is_closed:
            return current
        async with asyncio.timeout_at(deadline):
            # aio-pika's channels are aiormq's `Channel`.
            return cast(aiormq.Channel, await self._channel.get_underlay_channel())

    def _outgoing_message(
        self, channel: aiormq.Channel, publication: Publication, timeout_s: float
    ) -> Outgoing:
        method = self._method_frame(
            channel.number, publication.exchange, publication.routing_key, publication.mandatory
        )
        content = amqp_frames.content_frames(
            channel.number,
            publication.body,
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=publication.message_id,
            headers=publication.headers,
            max_body_frame=channel.max_content_size,
        )
        return Outgoing(channel, method + content, publication.message_id, timeout_s)

    async def _send_all(
        self,
        messages: list[Outgoing],
        left_s: float,
        timeout_s: float,
        confirmed: list[str] | None,
    ) -> list[PublishFailedError | None]:
        """Queue the messages for the next write and wait for every confirm, at most `left_s`
        (of the publish's `timeout_s`); the confirmed ones' ids go to `confirmed`."""
        self._outgoing.extend(messages)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_outgoing())
        confirmations = [message.confirmation for message in messages]
        try:
            await asyncio.wait(confirmations, timeout=max(left_s, 0))
        finally:
            if confirmed is not None:
                confirmed.extend(m.message_id for m in messages if _was_confirmed(m))
            for message in messages:
                message.expire()  # as an awaited `publish` would be, when cancelled
        return [_failure(message, timeout_s) for message in messages]

    def _method_frame(
        self, channel: int, exchange: str, routing_key: str, mandatory: bool
    ) -> bytes:
        key = (channel, exchange, routing_key, mandatory)
        method = self._method_frames.get(key)
        if method is None:
            method = amqp_frames.publish_method_frame(channel, exchange, routing_key, mandatory)
            self._method_frames[key] = method
        return method

    async def _send(self, message: Outgoing) -> None:
        """Queue the message for the next write and wait for its confirm. A nack raises
        aiormq's DeliveryError, a return (mandatory) its PublishError."""
        self._outgoing.append(message)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_outgoing())
        expiry = asyncio.get_running_loop().call_at(message.deadline, message.expire)
        try:
            await message.confirmation
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller is cancelled
            if message.expired:
                raise TimeoutError from None
            # aio-pika fails pending confirms with a CancelledError when a connection dies
            # of missed heartbeats: a failed publish, not a cancelled caller.
            raise ConnectionError("the channel closed before the confirm") from None
        finally:
            expiry.cancel()

    async def _write_outgoing(self) -> None:
        """Write what has been queued, one round at a time, until nothing is left."""
        try:
            while self._outgoing:
                queued, self._outgoing = self._outgoing, []
                for channel, messages in itertools.groupby(queued, key=lambda m: m.channel):
                    live = [m for m in messages if not m.confirmation.done()]
                    await write_round(channel, live)
        finally:
            self._writer = None

    async def _publish_through_aiormq(
        self,
        channel: aiormq.Channel,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: Mapping[str, Any] | None,
        mandatory: bool,
        timeout_s: float,
    ) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=message_id,
            headers=dict(headers) if headers else None,
        )
        # aiormq's deadline covers the channel lock and the confirm. wait=False: wait for
        # the confirm only, not for the writer task under the channel's lock.
        await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            timeout=timeout_s,
            wait=False,
        )

    async def _wait_for_earlier(self, message_id: str) -> None:
        """One publish per message id in flight: aiormq matches a returned message to its
        publish by message id, so with two in flight a return could fail the wrong one and
        the returned one be confirmed. Same ids are rare (a resent webhook): no cost."""
        while (earlier := self._publishing.get(message_id)) is not None:
            await asyncio.wait({earlier})

    @property
    def timeout_s(self) -> float:
        """How long a publish waits for its confirm unless told otherwise."""
        return self._timeout_s

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


CONTENT_TYPE = "application/json"


def _was_confirmed(message: Outgoing) -> bool:
    confirmation = message.confirmation
    return confirmation.done() and not confirmation.cancelled() and confirmation.exception() is None


def _is_nack(exc: BaseException | None) -> bool:
    """aiormq's error for a nack; a return (`PublishError`) is one of its kind, but says the
    route is missing, not that the broker refuses this channel."""
    return isinstance(exc, aiormq.exceptions.DeliveryError) and not isinstance(
        exc, aiormq.exceptions.PublishError
    )


def _was_refused(message: Outgoing) -> bool:
    confirmation = message.confirmation
    return (
        confirmation.done() and not confirmation.cancelled() and _is_nack(confirmation.exception())
    )


def _failure(message: Outgoing, timeout_s: float) -> PublishFailedError | None:
    """Why a settled message of `publish_many` failed; None when it was confirmed."""
    confirmation = message.confirmation
    if confirmation.cancelled() and not message.expired:
        return PublishFailedError("ConnectionError: the channel closed before the confirm")
    exc = None if confirmation.cancelled() else confirmation.exception()
    if confirmation.cancelled() or isinstance(exc, TimeoutError):  # its round's deadline
        return PublishFailedError(f"no confirm within {timeout_s:g}s")
    return None if exc is None else PublishFailedError(f"{type(exc).__name__}: {exc}")
