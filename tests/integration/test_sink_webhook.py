"""The webhook sink against a local receiver that verifies Standard Webhooks signatures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from callpipe_testing import TcpProxy, wait_for
from conftest import Services, free_port, make_settings
from sink_testing import FakeServer, RunningSinks, envelope, new_secret, publish_events
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from infra.broker import plain_headers
from infra.settings import Settings
from schemas import codec
from sinks.port import DeliveryResult, Done, Event, GiveUp, RetryLater
from sinks.service import run_sinks, try_sink
from sinks.telegram import TelegramSinkConfig
from sinks.topology import delay_queue
from sinks.webhook import WebhookSink, WebhookSinkConfig


class Receiver:
    """Verifies every request; answers by a script per event id, 200 once the script is done."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.verifier = Webhook(secret)
        self.script: dict[str, list[str]] = {}
        self.default = "200"
        self.delivered: Counter[str] = Counter()  # event ids answered 2xx
        self.attempts: Counter[str] = Counter()
        self.forged = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            document = self.verifier.verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.forged += 1
            return web.Response(status=401)
        event_id = document["event_id"]
        assert request.headers["webhook-id"] == event_id
        self.attempts[event_id] += 1
        steps = self.script.get(event_id, [])
        step = steps.pop(0) if steps else self.default
        if step == "hang":  # past the sink's timeout: it has given up before this answer
            await asyncio.sleep(3)
            return web.Response(status=200)
        if step == "200":
            self.delivered[event_id] += 1
        return web.Response(status=int(step))


@pytest.fixture
async def sinks(amqp: AbstractRobustConnection) -> AsyncIterator[RunningSinks]:
    running = RunningSinks(amqp)
    try:
        yield running
    finally:
        await running.remove()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, FakeServer, str]]:
    secret = new_secret()
    fake = Receiver(secret)
    server = FakeServer(fake.handle)
    url = await server.start()
    try:
        yield fake, server, url
    finally:
        await server.stop()


def webhook_config(url: str, secret: str, **overrides: Any) -> WebhookSinkConfig:
    values: dict[str, Any] = {
        "name": "crm",
        "url": f"{url}/hooks",
        "secret": secret,
        "retry_delays_s": [0.2, 0.4],
        "max_attempts": 10,
        "timeout_s": 0.5,
    }
    return WebhookSinkConfig.model_validate({**values, **overrides})


async def queue_depth(amqp: AbstractRobustConnection, name: str) -> int:
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


async def test_every_event_arrives_signed_through_503s_and_a_timeout(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, server, url = receiver
    events = [envelope(f"c{i}", outcome="answered" if i % 2 else "missed") for i in range(30)]
    for i, event in enumerate(events):
        if i % 5 == 0:
            fake.script[event["event_id"]] = ["503", "503", "503"]
    fake.script[events[7]["event_id"]] = ["hang"]
    fake.script[events[9]["event_id"]] = ["429", "500", "408"]
    config = webhook_config(url, fake.secret)
    await sinks.start(settings, [config])
    await publish_events(amqp, settings, events)

    wanted = {event["event_id"] for event in events}

    async def all_delivered() -> bool:
        return set(fake.delivered) >= wanted

    await wait_for(all_delivered, seconds=30, what="every event delivered")
    assert fake.forged == 0
    assert set(fake.delivered) == wanted
    assert fake.attempts[events[0]["event_id"]] == 4  # three 503s, then 200
    assert fake.attempts[events[9]["event_id"]] == 4
    # The one that hung past the timeout was sent again: at least once, deduped by webhook-id.
    assert fake.attempts[events[7]["event_id"]] >= 2
    bodies = {codec.loads(body)["event_id"]: body for _, body, _ in server.requests}
    assert codec.loads(bodies[events[3]["event_id"]]) == events[3]  # the envelope as published


async def test_events_waiting_in_backoff_survive_a_sink_restart(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, _, url = receiver
    fake.default = "503"  # the destination is down
    config = webhook_config(url, fake.secret, retry_delays_s=[2.0])
    events = [envelope(f"r{i}") for i in range(10)]
    await sinks.start(settings, [config])
    await publish_events(amqp, settings, events)
    wanted = {event["event_id"] for event in events}

    async def all_tried_once() -> bool:
        return set(fake.attempts) == wanted

    await wait_for(all_tried_once, what="a first attempt of every event")
    await sinks.stop()  # mid-backoff: the events wait in the delay queue, not in this process
    waiting = await queue_depth(amqp, delay_queue(settings.topology, "crm", 2.0))
    assert waiting + await queue_depth(amqp, settings.topology.sink_queue("crm")) == len(events)
    fake.default = "200"  # the destination is back
    await sinks.start(settings, [config])

    async def all_delivered() -> bool:
        return set(fake.delivered) == wanted

    await wait_for(all_delivered, seconds=20, what="every event delivered after the restart")
    assert sum(fake.delivered.values()) == len(events)


async def dead_letters(amqp: AbstractRobustConnection, settings: Settings) -> list[Any]:
    found = []
    async with amqp.channel() as channel:
        queue = await channel.get_queue(settings.topology.dead_queue)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append(message)
    return found


async def test_a_refusing_destination_dead_letters_each_event_once(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, _, url = receiver
    fake.default = "410"
    config = webhook_config(url, fake.secret)
    events = [envelope(f"g{i}") for i in range(3)]
    await sinks.start(settings, [config])
    await publish_events(amqp, settings, events)
    seen: list[Any] = []

    async def all_dead() -> bool:
        seen.extend(await dead_letters(amqp, settings))
        return len(seen) >= len(events)

    await wait_for(all_dead, what="three dead letters")
    await sinks.stop()
    assert sorted(message.message_id for message in seen) == sorted(e["event_id"] for e in events)
    for message in seen:
        headers = plain_headers(message.headers)
        assert "HTTP 410" in headers["x-callpipe-error"]
        assert headers["x-callpipe-sink"] == "crm"
        assert message.routing_key == "call.ended.missed"
        assert codec.loads(message.body)["event_id"] == message.message_id
    # Nothing is waiting for another try: 410 is final, so one request per event.
    assert await queue_depth(amqp, settings.topology.sink_queue("crm")) == 0
    assert await queue_depth(amqp, delay_queue(settings.topology, "crm", 0.2)) == 0
    assert await dead_letters(amqp, settings) == []
    assert fake.attempts == {event["event_id"]: 1 for event in events}


async def test_attempts_are_bounded_then_dead_lettered(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, _, url = receiver
    fake.default = "500"
    config = webhook_config(url, fake.secret, max_attempts=3)
    await sinks.start(settings, [config])
    await publish_events(amqp, settings, [envelope("x1")])
    seen: list[Any] = []

    async def dead() -> bool:
        seen.extend(await dead_letters(amqp, settings))
        return bool(seen)

    await wait_for(dead, what="the dead letter")
    assert fake.attempts["acme:x1:end"] == 3
    assert (
        "gave up after 3 attempts: HTTP 500" in plain_headers(seen[0].headers)["x-callpipe-error"]
    )


async def test_binding_keys_and_projects_filter_what_is_sent(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, _, url = receiver
    config = webhook_config(url, fake.secret, events=["call.ended.missed"], projects=["acme"])
    await sinks.declare(settings, [config])
    events = [
        envelope("f1"),
        envelope("f2", project="beta"),
        envelope("f3", outcome="answered"),
        envelope("f4", outcome=None),
        envelope("last"),
    ]
    await publish_events(amqp, settings, events)  # confirmed: routed by now
    # Only the missed calls are bound (f1, f2, last); the project is the sink's to judge.
    assert await queue_depth(amqp, settings.topology.sink_queue("crm")) == 3
    await sinks.start(settings, [config])

    async def last_arrived() -> bool:
        return "acme:last:end" in fake.delivered

    await wait_for(last_arrived, what="the last event")
    # f2 was consumed and skipped before "last" (one queue, in order).
    assert await queue_depth(amqp, settings.topology.sink_queue("crm")) == 0
    assert set(fake.attempts) == {"acme:f1:end", "acme:last:end"}


async def test_trying_a_destination_sends_one_signed_sample(
    settings: Settings, receiver: tuple[Receiver, FakeServer, str]
) -> None:
    fake, _, url = receiver
    result = await try_sink(settings, webhook_config(url, fake.secret))
    assert result == Done()
    assert fake.forged == 0
    (event_id,) = fake.delivered
    assert event_id.startswith("callpipe-test:test-")
    fake.default = "410"
    assert isinstance(await try_sink(settings, webhook_config(url, fake.secret)), GiveUp)


def settle_failures(caplog: pytest.LogCaptureFixture, event_id: str) -> list[logging.LogRecord]:
    """The sink's failed tries to settle the event (its debug lines, one per try)."""
    return [
        r
        for r in caplog.records
        if r.name == "sinks.consumer"
        and r.levelno == logging.DEBUG
        and f"settling {event_id} failed" in r.getMessage()
    ]


async def start_without_its_delay_queue(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    config: WebhookSinkConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Start the sink, then delete its delay queue by hand: a retry cannot be published."""
    await sinks.start(settings, [config])

    async def consuming() -> bool:
        return f"sink {config.name} consuming" in caplog.text

    await wait_for(consuming, what="the sink consuming")
    async with amqp.channel() as channel:
        await channel.queue_delete(delay_queue(settings.topology, config.name, 0.3))


async def test_an_event_that_cannot_be_delayed_is_held_tried_ever_more_patiently_and_not_lost(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sinks.consumer")
    fake, _, url = receiver
    fake.script["acme:h1:end"] = ["503"]
    config = webhook_config(url, fake.secret, retry_delays_s=[0.3])
    await start_without_its_delay_queue(settings, amqp, sinks, config, caplog)
    await publish_events(amqp, settings, [envelope("h1")])

    async def three_tries() -> bool:
        return len(settle_failures(caplog, "acme:h1:end")) >= 3

    await wait_for(three_tries, seconds=30, what="three tries to settle the held event")
    first, second, third = settle_failures(caplog, "acme:h1:end")[:3]
    # The wait between tries doubles (1 s, then 2 s), instead of one try a second.
    assert third.created - second.created > 1.5 * (second.created - first.created) > 1.4
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "cannot settle acme:h1:end" in r.getMessage()
    ]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]

    await sinks.declare(settings, [config])  # `callpipe setup` again: the queue is back

    async def delivered() -> bool:
        return fake.delivered["acme:h1:end"] == 1

    await wait_for(delivered, seconds=30, what="the delivery once the delay queue is back")
    assert "settled acme:h1:end after" in caplog.text


async def test_a_retry_whose_confirm_does_not_come_waits_for_it_and_a_stop_ends_the_wait(
    services: Services,
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that reads nothing (an alarm): a copy whose confirm has not come may still be
    stored when it reads on, so the second try waits for its confirm instead of sending a
    copy a second; and a stop does not wait for that confirm."""
    caplog.set_level(logging.DEBUG, logger="sinks.consumer")
    fake, _, url = receiver
    fake.script["acme:p1:end"] = ["hang"]  # past the sink's 0.5 s: a retry to delay
    config = webhook_config(url, fake.secret, retry_delays_s=[0.3])
    proxy = TcpProxy.in_front_of(services.amqp_url)
    await proxy.start()
    try:
        proxied = settings.model_copy(
            update={
                "amqp_url": proxy.route(services.amqp_url),
                "publish_timeout_s": 0.3,
                "shutdown_timeout_s": 60.0,  # a stop that waited for the confirm would show
            }
        )
        await sinks.declare(settings, [config])
        await sinks.start(proxied, [config])
        await publish_events(amqp, settings, [envelope("p1")])

        async def hanging() -> bool:
            return fake.attempts["acme:p1:end"] == 1

        await wait_for(hanging, what="the first attempt")
        proxy.freeze()  # before the sink gives up on the destination and settles

        async def second_try_waiting() -> bool:
            return "settling acme:p1:end again (try 2), waiting up to 3600s" in caplog.text

        await wait_for(second_try_waiting, seconds=30, what="the second try waiting")
        failures = [r.getMessage() for r in settle_failures(caplog, "acme:p1:end")]
        assert len(failures) == 1 and "no confirm within 0.3s" in failures[0], failures
        stopped = time.monotonic()
        await sinks.stop()
        assert time.monotonic() - stopped < 15  # not the 60 s shutdown timeout
        assert "settled acme:p1:end" not in caplog.text
    finally:
        await sinks.stop()
        await proxy.cut()


async def test_a_message_that_is_not_an_event_is_dead_lettered(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, _, url = receiver
    await sinks.start(settings, [webhook_config(url, fake.secret)])
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(settings.topology.events_exchange)
        await exchange.publish(aio_pika.Message(b"not json", message_id="junk"), "call.started")
    seen: list[Any] = []

    async def dead() -> bool:
        seen.extend(await dead_letters(amqp, settings))
        return bool(seen)

    await wait_for(dead, what="the dead letter")
    assert seen[0].body == b"not json"
    assert plain_headers(seen[0].headers)["x-callpipe-error"] == "not JSON: not an event"
    assert not fake.attempts


async def test_a_sink_consumes_again_after_the_broker_link_drops(
    services: Services,
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, _, url = receiver
    proxy = TcpProxy.in_front_of(services.amqp_url)
    await proxy.start()
    try:
        proxied = settings.model_copy(update={"amqp_url": proxy.route(services.amqp_url)})
        await sinks.start(proxied, [webhook_config(url, fake.secret)])
        await publish_events(amqp, settings, [envelope("before")])

        async def first() -> bool:
            return "acme:before:end" in fake.delivered

        await wait_for(first, what="the event before the drop")
        await proxy.cut()
        await proxy.restore()
        await publish_events(amqp, settings, [envelope("after")])

        async def second() -> bool:
            return "acme:after:end" in fake.delivered

        await wait_for(second, seconds=30, what="the event after the link came back")
    finally:
        await sinks.stop()
        await proxy.cut()


async def test_retry_after_is_kept_by_the_delay_queue_across_a_restart(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    fake, server, url = receiver
    fake.script["acme:ra:end"] = ["429"]
    seen: list[float] = []
    answer_429 = fake.handle

    async def stamped(request: web.Request) -> web.StreamResponse:
        seen.append(time.monotonic())
        response = await answer_429(request)
        if response.status == 429:
            response.headers["Retry-After"] = "2"
        return response

    server.handler = stamped
    config = webhook_config(url, fake.secret, retry_delays_s=[0.2, 2.5])
    await sinks.start(settings, [config])
    await publish_events(amqp, settings, [envelope("ra")])

    async def refused_once() -> bool:
        return len(seen) == 1

    await wait_for(refused_once, what="the 429")
    await sinks.stop()  # the in-process pause is gone: only the delay queue remembers
    await sinks.start(settings, [config])

    async def delivered() -> bool:
        return "acme:ra:end" in fake.delivered

    await wait_for(delivered, what="the delivery after the wait")
    assert seen[1] - seen[0] >= 2.0  # the 2.5 s step, the shortest that honours 2 s


@contextlib.asynccontextmanager
async def raw_destination(answer: bytes, stall_s: float = 0.0) -> AsyncIterator[str]:
    """A destination that reads the request's head, writes `answer` as it is, then holds the
    connection open for `stall_s`: an answer's body that never comes, or a malformed one."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(stall_s)  # the fake destination stalling, not a wait
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, Done()), (400, GiveUp("HTTP 400: the destination refused the event"))],
)
async def test_the_status_answers_even_when_the_body_stalls(
    status: int, expected: DeliveryResult
) -> None:
    """The destination sent its status, then no body before the timeout: a 200 is delivered
    (retrying would send it twice), a 400 refused (retrying would not change it)."""
    head = f"HTTP/1.1 {status} X\r\ncontent-length: 100\r\n\r\n".encode()
    async with raw_destination(head, stall_s=2.0) as url:
        sink = WebhookSink.open(webhook_config(url, new_secret(), timeout_s=0.5))
        try:
            assert await sink.deliver(sample_event("b1")) == expected
        finally:
            await sink.close()


async def test_a_malformed_answer_does_not_put_the_url_in_the_reason() -> None:
    """A secret in the destination's path (as Bitrix24's hooks have) stays out of the reason
    that goes to the log and to `{ns}.dead`."""
    async with raw_destination(b"HTTP/1.1 abc\r\n\r\n") as url:
        sink = WebhookSink.open(webhook_config(f"{url}/rest/1/SECRETTOKEN", new_secret()))
        try:
            result = await sink.deliver(sample_event("m1"))
        finally:
            await sink.close()
    assert isinstance(result, RetryLater)
    assert "SECRETTOKEN" not in result.reason
    assert result.reason.startswith("ClientResponseError: 400")


async def test_an_event_id_that_cannot_be_a_header_is_given_up_at_once() -> None:
    async with raw_destination(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as url:
        sink = WebhookSink.open(webhook_config(url, new_secret()))
        try:
            result = await sink.deliver(sample_event("bad\ncall"))
        finally:
            await sink.close()
    assert result == GiveUp("the event cannot be sent as a request: ValueError")


def sample_event(call_id: str) -> Event:
    document = envelope(call_id)
    return Event(codec.dumps(document), document, "call.ended.missed")


async def test_events_sent_straight_to_the_queue_are_filtered_like_bound_ones(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    """A replay (`replay-events --to sink.crm`) or a requeue sends straight to the sink's
    queue, past its bindings: a sink for call ends must still get no call start."""
    fake, _, url = receiver
    await sinks.start(settings, [webhook_config(url, fake.secret, events=["call.ended.*"])])
    queue = settings.topology.sink_queue("crm")
    async with amqp.channel(publisher_confirms=True) as channel:
        for event in (envelope("s1", outcome=None), envelope("s2")):
            message = aio_pika.Message(codec.dumps(event), message_id=event["event_id"])
            await channel.default_exchange.publish(message, queue)

    async def ended_arrived() -> bool:
        return "acme:s2:end" in fake.delivered

    await wait_for(ended_arrived, what="the call end sent straight to the queue")
    assert await queue_depth(amqp, queue) == 0
    assert set(fake.attempts) == {"acme:s2:end"}


async def test_a_sink_waiting_for_the_database_holds_back_no_other(
    services: Services,
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    """PostgreSQL unreachable: the Telegram sink cannot open (its alerts live there), and
    the webhook sink, which needs no database, delivers all the same."""
    fake, _, url = receiver
    no_database = make_settings(
        services,
        settings.namespace,
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
    )
    missed = TelegramSinkConfig.model_validate(
        {"name": "missed", "bot_token": "123456:TEST-token", "chat_id": -100123}
    )
    await sinks.start(no_database, [missed, webhook_config(url, fake.secret)])
    await publish_events(amqp, settings, [envelope("w1")])

    async def delivered() -> bool:
        return "acme:w1:end" in fake.delivered

    await wait_for(delivered, what="the webhook sink's delivery while the database is away")
    # The Telegram sink's event waits in its queue, for when it can open.
    assert await queue_depth(amqp, settings.topology.sink_queue("missed")) == 1


async def test_a_sink_that_fails_stops_the_others_before_its_error_is_raised(
    services: Services,
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    receiver: tuple[Receiver, FakeServer, str],
) -> None:
    """The Telegram sink opens once PostgreSQL is back, and fails (its queue was deleted
    meanwhile): the webhook sink beside it stops and finishes, and no sink's task outlives
    `run_sinks`, which raises the failure."""
    fake, _, url = receiver
    proxy = TcpProxy.in_front_of(services.database_url)
    await proxy.start()
    try:
        await proxy.cut()
        proxied = settings.model_copy(update={"database_url": proxy.route(services.database_url)})
        missed = TelegramSinkConfig.model_validate(
            {"name": "missed", "bot_token": "123456:TEST-token", "chat_id": -100123}
        )
        configs = [missed, webhook_config(url, fake.secret)]
        await sinks.declare(settings, configs)
        stop = asyncio.Event()
        running = asyncio.create_task(run_sinks(proxied, configs, stop))
        try:
            await publish_events(amqp, settings, [envelope("s1")])

            async def delivered() -> bool:
                return "acme:s1:end" in fake.delivered

            await wait_for(delivered, what="the webhook sink delivering")
            async with amqp.channel() as channel:
                await channel.queue_delete(settings.topology.sink_queue("missed"))
            await proxy.restore()

            async def ended() -> bool:
                return running.done()

            await wait_for(ended, seconds=30, what="run_sinks ending with the failure")
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running, timeout=20)
        assert isinstance(running.exception(), aio_pika.exceptions.ChannelNotFoundEntity)
        left = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") in ("_open_and_run", "SinkConsumer.run")
        ]
        assert left == []
    finally:
        await proxy.cut()
