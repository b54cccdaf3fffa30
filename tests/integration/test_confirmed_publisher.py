"""The confirmed publisher on the real broker: a 200 may never stand for a returned message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import cast

import aio_pika
import aiormq
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from callpipe_testing import TcpProxy, wait_for
from conftest import Services

from infra.broker import connect
from infra.confirmed_publisher import ConfirmedPublisher, Publication, PublishFailedError
from infra.publish_rounds import can_write_frames
from infra.refusals import RefusalWatch


@contextlib.contextmanager
def writer_stopped(channel: aiormq.Channel) -> Iterator[None]:
    """As if the connection's writer had stopped: the channel's writer queue is full and
    never makes room. Put back when the block ends, failing or not."""
    real_queue = channel.write_queue
    full: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
    full.put_nowait(object())
    channel.write_queue = full
    try:
        yield
    finally:
        channel.write_queue = real_queue


@contextlib.asynccontextmanager
async def full_and_ok_queues(amqp: AbstractRobustConnection) -> AsyncIterator[tuple[str, str]]:
    """Two queues of this test's own, deleted after, failing or not: one that refuses every
    publish (x-max-length 0, reject-publish: a nack), and one that takes them."""
    full = f"cpt_full_{uuid.uuid4().hex[:8]}"
    ok = f"cpt_ok_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        await channel.declare_queue(
            full, auto_delete=False, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await channel.declare_queue(ok, auto_delete=False)
        try:
            yield full, ok
        finally:
            await channel.queue_delete(full)
            await channel.queue_delete(ok)


async def test_concurrent_duplicates_to_an_unroutable_route_all_fail(
    amqp: AbstractRobustConnection,
) -> None:
    """aiormq matches a return to its publish by message_id: with two publishes of one id in
    flight, a return could fail the wrong one and the returned one be confirmed."""
    exchange = f"cpt_unroutable_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=False)
    publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
    try:
        for _ in range(5):
            results = await asyncio.gather(
                *(
                    publisher.publish(exchange, "nowhere", b"{}", message_id="acme:1:start")
                    for _ in range(20)
                ),
                return_exceptions=True,
            )
            assert all(isinstance(result, PublishFailedError) for result in results), results
    finally:
        await publisher.close()
        async with amqp.channel() as channel:
            await channel.exchange_delete(exchange)


async def test_a_round_of_concurrent_publishes_arrives_whole_with_its_properties(
    amqp: AbstractRobustConnection,
) -> None:
    """The frames callpipe writes itself: every message confirmed and read back as sent,
    bodies over the broker's frame size included (split into several body frames)."""
    name = f"cpt_frames_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(name, auto_delete=False)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
        try:
            underlay = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
            # Without this, every publish would go through aiormq's basic_publish.
            assert can_write_frames(underlay)
            big = b'{"blob": "' + b"x" * (3 * underlay.max_content_size) + b'"}'
            sent = {
                f"acme:{i}:start": (
                    big if i % 50 == 0 else orjson.dumps({"id": i}),
                    {"x-callpipe-project": "acme", "x-n": str(i)},
                )
                for i in range(300)
            }
            await asyncio.gather(
                *(
                    publisher.publish("", name, body, message_id=mid, headers=headers)
                    for mid, (body, headers) in sent.items()
                )
            )
            assert (await queue.declare()).message_count == len(sent)
            received = {}
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    assert message.content_type == "application/json"
                    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                    received[message.message_id] = (message.body, message.headers)
                    if len(received) == len(sent):
                        break
            assert received == sent
        finally:
            await publisher.close()
            await channel.queue_delete(name)


async def test_a_nack_and_a_return_fail_only_their_own_publish(
    amqp: AbstractRobustConnection,
) -> None:
    """In one round: a full queue (reject-publish) nacks, an unroutable route returns, and
    the messages around them are confirmed."""
    async with full_and_ok_queues(amqp) as (full, ok):
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
        try:
            routes = {f"m{i}": (full, ok, "cpt-no-such-queue")[i % 3] for i in range(30)}
            results = await asyncio.gather(
                *(publisher.publish("", route, b"{}", message_id=m) for m, route in routes.items()),
                return_exceptions=True,
            )
            for (m, route), result in zip(routes.items(), results, strict=True):
                if route == ok:
                    assert result is None, (m, result)
                else:
                    assert isinstance(result, PublishFailedError), (m, route, result)
            assert "DeliveryError" in str(results[0]) and "PublishError" in str(results[2])
        finally:
            await publisher.close()


async def test_no_confirm_in_time_fails_the_publish_and_the_next_one_goes_through(
    amqp: AbstractRobustConnection, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"cpt_slow_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        await channel.declare_queue(name, auto_delete=False)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
        try:
            with pytest.raises(PublishFailedError, match="no confirm within"):
                await publisher.publish("", name, b"{}", message_id="late", timeout_s=1e-6)
            await publisher.publish("", name, b"{}", message_id="next")
            # The late confirm, if the message went out, is dropped quietly.
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        finally:
            await publisher.close()
            await channel.queue_delete(name)


async def test_a_writer_that_makes_no_room_fails_the_round_and_the_next_one_goes_through(
    amqp: AbstractRobustConnection,
) -> None:
    """A connection whose writer has died never takes another frame. The round that waits for
    room fails when the publish's time is up, gives its delivery tags back, and does not
    stop the rounds after it (which would all time out, and the ingress spool everything)."""
    name = f"cpt_stuck_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        await channel.declare_queue(name, auto_delete=False)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
        underlay = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
        try:
            with writer_stopped(underlay):
                tag_before = underlay.delivery_tag
                with pytest.raises(PublishFailedError, match="no confirm within"):
                    await publisher.publish("", name, b"{}", message_id="stuck", timeout_s=0.3)

                async def given_back() -> bool:
                    return underlay.delivery_tag == tag_before and not underlay.confirmations

                await wait_for(given_back, seconds=5, what="the round's delivery tag given back")
            await asyncio.wait_for(
                publisher.publish("", name, b"{}", message_id="after", timeout_s=5), timeout=10
            )
            queue = await channel.get_queue(name)
            message = await queue.get(timeout=5)
            assert message.message_id == "after"
            await message.ack()
        finally:
            await publisher.close()
            await channel.queue_delete(name)


async def test_a_channel_closed_under_a_waiting_publish_fails_it_not_its_caller(
    amqp: AbstractRobustConnection,
) -> None:
    """aiormq fails the pending confirms of a channel closing with a CancelledError (its
    default, and aio-pika's when a connection dies of missed heartbeats). The publish must
    fail as a publish: a CancelledError would end the caller's task as if it had been
    cancelled (a worker's batch task, leaving its delivery unsettled; an ingress request,
    never answered)."""
    publisher = await ConfirmedPublisher.open(amqp, timeout_s=30)
    underlay = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
    try:
        with writer_stopped(underlay):  # the publish waits in its round, confirm pending
            publishing = asyncio.create_task(
                publisher.publish("", "cpt-anywhere", b"{}", message_id="closing")
            )

            async def waiting() -> bool:
                return publisher._writer is not None

            await wait_for(waiting, seconds=5, what="the publish waiting in its round")
            # What aiormq does with a channel's futures when it closes with a CancelledError.
            await underlay._cancel_tasks(asyncio.CancelledError())
            with pytest.raises(PublishFailedError, match="closed before the confirm"):
                await asyncio.wait_for(publishing, timeout=10)
    finally:
        await publisher.close()


# --- publish_many: the outbox relay's batches --------------------------------------------


async def test_publish_many_confirms_each_and_fails_only_its_own(
    amqp: AbstractRobustConnection,
) -> None:
    """One batch: a full queue nacks, an unroutable mandatory message returns, an id twice in
    the batch is published twice (one at a time), and the rest arrive as sent."""
    async with full_and_ok_queues(amqp) as (full, ok), amqp.channel() as channel:
        queue = await channel.get_queue(ok)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
        try:
            routes = {f"m{i}": (full, ok, "cpt-no-such-queue")[i % 3] for i in range(30)}
            batch = [Publication("", r, f'{{"m": "{m}"}}'.encode(), m) for m, r in routes.items()]
            confirmed: list[str] = []
            results = await publisher.publish_many(batch, confirmed=confirmed)
            for (m, route), result in zip(routes.items(), results, strict=True):
                assert (result is None) == (route == ok), (m, route, result)
            assert sorted(confirmed) == sorted(m for m, r in routes.items() if r == ok)
            assert "DeliveryError" in str(results[0]) and "PublishError" in str(results[2])
            assert not publisher._publishing

            twice = [Publication("", ok, b'{"again": 1}', "same", {"x-n": "1"})] * 2
            assert await publisher.publish_many(twice) == [None, None]

            received: dict[str | None, list[bytes]] = {}
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    received.setdefault(message.message_id, []).append(message.body)
                    if sum(len(bodies) for bodies in received.values()) == 12:
                        break
            expected = {m: [f'{{"m": "{m}"}}'.encode()] for m, r in routes.items() if r == ok}
            assert received == {**expected, "same": [b'{"again": 1}'] * 2}
        finally:
            await publisher.close()


async def test_publish_many_without_a_confirm_in_time_fails_each_and_the_next_goes(
    amqp: AbstractRobustConnection,
) -> None:
    name = f"cpt_stuck_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(name, auto_delete=False)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10)
        underlay = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
        try:
            batch = [Publication("", name, b"{}", f"stuck-{i}") for i in range(5)]
            with writer_stopped(underlay):
                results = await publisher.publish_many(batch, timeout_s=0.3)
            assert [str(r) for r in results] == ["no confirm within 0.3s"] * 5
            after = [Publication("", name, b"{}", f"after-{i}") for i in range(5)]
            assert await asyncio.wait_for(publisher.publish_many(after), timeout=10) == [None] * 5
            assert (await queue.declare()).message_count == 5
        finally:
            await publisher.close()
            await channel.queue_delete(name)


async def test_publish_many_cancelled_lets_go_of_its_messages(
    amqp: AbstractRobustConnection,
) -> None:
    """The caller cancelled while its batch waits: the cancellation reaches the caller, the
    pending confirms are let go (as an awaited publish's would be), and the ids are free."""
    # Short: the round itself waits for room until its deadline, and holds the channel.
    publisher = await ConfirmedPublisher.open(amqp, timeout_s=3)
    underlay = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
    try:
        with writer_stopped(underlay):
            batch = [Publication("", "cpt-anywhere", b"{}", f"c{i}") for i in range(3)]
            publishing = asyncio.create_task(publisher.publish_many(batch))

            async def waiting() -> bool:
                return publisher._writer is not None

            await wait_for(waiting, seconds=5, what="the batch waiting in its round")
            publishing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await publishing
            assert not publisher._publishing
            assert not [c for c in underlay.confirmations.values() if not c.done()]
    finally:
        await publisher.close()


async def test_publish_many_on_a_closed_channel_fails_each_without_raising(
    amqp: AbstractRobustConnection,
) -> None:
    publisher = await ConfirmedPublisher.open(amqp, timeout_s=5)
    await publisher.close()
    results = await publisher.publish_many([Publication("", "cpt-x", b"{}", "a")] * 1)
    assert [type(r) for r in results] == [PublishFailedError]
    assert "closed" in str(results[0])


async def test_a_publish_while_the_broker_is_away_fails_in_its_time_and_works_once_back(
    services: Services,
) -> None:
    """The link to the broker is gone and the connection keeps trying to reconnect: a
    publish, and a batch, fail within their timeout instead of waiting for the broker (the
    relay holds a database transaction meanwhile), and publish again once it is back."""
    proxy = TcpProxy.in_front_of(services.amqp_url)
    await proxy.start()
    connection = await connect(proxy.route(services.amqp_url), name="cpt-away")
    try:
        publisher = await ConfirmedPublisher.open(connection, timeout_s=1)
        assert await publisher.publish_many(
            [Publication("", "cpt-x", b"{}", "before", None, False)]
        ) == [None]
        await proxy.cut()

        async def failed_in_time() -> None:
            with pytest.raises(PublishFailedError):
                await publisher.publish("", "cpt-x", b"{}", message_id="away", mandatory=False)
            [failure] = await publisher.publish_many(
                [Publication("", "cpt-x", b"{}", "a", None, False)]
            )
            assert isinstance(failure, PublishFailedError)

        await asyncio.wait_for(failed_in_time(), timeout=10)
        await proxy.restore()

        async def published() -> bool:
            batch = [Publication("", "cpt-x", b"{}", "back", None, False)]
            return await publisher.publish_many(batch) == [None]

        await wait_for(published, seconds=30, what="a publish once the broker is back")
    finally:
        await connection.close()
        await proxy.cut()


async def test_publish_many_through_aiormq_publishes_each(
    amqp: AbstractRobustConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where aiormq lacks what writing frames needs, each message goes through its
    basic_publish: the batch's own ids must not make those publishes wait for the batch."""
    monkeypatch.setattr("infra.confirmed_publisher.can_write_frames", lambda channel: False)
    name = f"cpt_each_{uuid.uuid4().hex[:8]}"
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(name, auto_delete=False)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=5)
        try:
            batch = [Publication("", name, b"{}", f"each-{i}") for i in range(3)]
            confirmed: list[str] = []
            results = await asyncio.wait_for(
                publisher.publish_many(batch, confirmed=confirmed), timeout=10
            )
            assert results == [None, None, None]
            assert sorted(confirmed) == ["each-0", "each-1", "each-2"]
            assert (await queue.declare()).message_count == 3
        finally:
            await publisher.close()
            await channel.queue_delete(name)


async def test_publish_many_cancelled_after_a_confirm_still_reports_it(
    services: Services, amqp: AbstractRobustConnection
) -> None:
    """The caller is cancelled the moment the first confirm arrives: the cancellation reaches
    it, and `confirmed` holds exactly the messages confirmed by then (the relay names those
    as sent: they will go out again)."""
    name = f"cpt_cut_{uuid.uuid4().hex[:8]}"
    proxy = TcpProxy.in_front_of(services.amqp_url)
    await proxy.start()
    connection = await connect(proxy.route(services.amqp_url), name="cpt-cut")
    async with amqp.channel() as channel:
        await channel.declare_queue(name, auto_delete=False)
        try:
            publisher = await ConfirmedPublisher.open(connection, timeout_s=30)
            underlay = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
            batch = [Publication("", name, b"{}", f"cut-{i}") for i in range(50)]
            confirmed: list[str] = []
            proxy.freeze()  # the frames go out, the confirms wait in the proxy
            publishing = asyncio.create_task(publisher.publish_many(batch, confirmed=confirmed))

            async def registered() -> bool:
                return len(underlay.confirmations) == len(batch)

            await wait_for(registered, seconds=10, what="the batch's confirmations registered")
            by_id = {
                m: underlay.confirmations[t] for m, t in underlay.message_id_delivery_tag.items()
            }
            first = underlay.confirmations[min(underlay.confirmations)]
            first.add_done_callback(lambda _: publishing.cancel())
            proxy.thaw()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(publishing, timeout=15)
            acked = {m for m, f in by_id.items() if not f.cancelled() and f.exception() is None}
            assert "cut-0" in acked and set(confirmed) == acked
        finally:
            await connection.close()
            await proxy.cut()
            await channel.queue_delete(name)


async def test_a_channel_the_broker_refuses_everything_on_is_replaced(
    amqp: AbstractRobustConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """After refusals in a row (a RabbitMQ cluster before 3.12.5 can refuse every publish on
    a channel whose first publish met a dying quorum leader), the publisher gives up its
    channel; aio-pika opens a new one and publishing goes on. Returns do not count."""
    async with full_and_ok_queues(amqp) as (full, ok):
        watch = RefusalWatch(refusals=3, refused_for_s=0.0)
        publisher = await ConfirmedPublisher.open(amqp, timeout_s=10, refusals=watch)
        try:
            first = cast(aiormq.Channel, await publisher._channel.get_underlay_channel())
            for n in range(5):  # returned, not refused
                with pytest.raises(PublishFailedError, match="PublishError"):
                    await publisher.publish("", "cpt-no-such-queue", b"{}", message_id=f"r{n}")
            for n in range(2):
                with pytest.raises(PublishFailedError, match="DeliveryError"):
                    await publisher.publish("", full, b"{}", message_id=f"a{n}")
            assert not first.is_closed and "opening a new one" not in caplog.text
            batch = [Publication("", full, b"{}", f"b{n}") for n in range(2)]
            assert all(result is not None for result in await publisher.publish_many(batch))

            async def replaced() -> bool:
                return first.is_closed

            await wait_for(replaced, what="the refused channel closed")
            assert "refused every publish on channel" in caplog.text
            await publisher.publish("", ok, b"{}", message_id="after")  # on the new channel
            second = await publisher._channel.get_underlay_channel()
            assert second is not first and not second.is_closed
        finally:
            await publisher.close()
