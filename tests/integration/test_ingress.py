"""The ingress against the real broker: what a 200 means, and every way to get something else."""

from __future__ import annotations

import asyncio
import gzip
import random
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from callpipe_testing import take_queued, wait_for

from infra.broker import plain_headers
from infra.settings import Settings
from ingress.app import SPOOL, init_app
from schemas import codec
from schemas.topology import Topology

Client = TestClient[Any, Any]

CALL = {
    "id": "100500",
    "caller": "79990009911",
    "callee": "74951234567",
    "date": "2026-11-25 10:00:00",
    "city": "Москва",
}


async def drain(
    amqp: AbstractConnection, queue_name: str, found: list[AbstractIncomingMessage] | None = None
) -> list[AbstractIncomingMessage]:
    """Every message now in a queue (acked, so the queue is left empty), added to `found`."""
    found = [] if found is None else found
    async with amqp.channel() as channel:
        queue = await channel.get_queue(queue_name)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            found.append(message)
    return found


async def test_valid_call_start_is_confirmed_and_queued_unchanged(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    body = codec.dumps(CALL)
    response = await client.post("/roistat/tok-acme/call-start", data=body)
    assert response.status == 200
    assert await response.json() == {"accepted": True, "event_id": "acme:100500:start"}

    [message] = await drain(amqp, settings.topology.call_queue("start"))
    assert message.body == body
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == "acme:100500:start"
    headers = plain_headers(message.headers)
    assert headers["x-callpipe-project"] == "acme"
    assert headers["x-callpipe-kind"] == "start"
    assert headers["x-callpipe-received-at"].endswith("+00:00")
    assert headers["x-callpipe-remote-addr"] == "127.0.0.1"
    assert await drain(amqp, settings.topology.call_queue("end")) == []


async def test_call_end_goes_to_the_call_end_queue_whatever_the_content_type(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    body = codec.dumps({**CALL, "status": "ANSWER", "duration": "35"})
    response = await client.post(
        "/roistat/tok-beta/call-end", data=body, headers={"Content-Type": "text/plain"}
    )
    assert response.status == 200
    [message] = await drain(amqp, settings.topology.call_queue("end"))
    assert message.body == body
    assert plain_headers(message.headers)["x-callpipe-project"] == "beta"


@pytest.mark.parametrize(
    ("extra", "queue_kind", "kind"),
    [
        ({}, "start", "start"),
        ({"status": None, "duration": None}, "start", "start"),
        ({"status": "NOANSWER"}, "end", "end"),
        ({"duration": 0}, "end", "end"),
    ],
)
async def test_single_url_detects_the_kind(
    client: Client,
    settings: Settings,
    amqp: AbstractRobustConnection,
    extra: dict[str, Any],
    queue_kind: str,
    kind: str,
) -> None:
    response = await client.post("/roistat/tok-acme", data=codec.dumps({**CALL, **extra}))
    assert response.status == 200
    assert (await response.json())["event_id"] == f"acme:100500:{kind}"
    [message] = await drain(amqp, settings.topology.call_queue(queue_kind))  # type: ignore[arg-type]
    assert plain_headers(message.headers)["x-callpipe-kind"] == kind


async def test_unknown_token_is_404_with_no_hint_and_nothing_published(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    response = await client.post("/roistat/tok-acmf/call-start", data=codec.dumps(CALL))
    assert response.status == 404
    assert await response.json() == {"error": "not found"}
    for queue in settings.topology.work_queues:
        assert await drain(amqp, queue) == []


async def test_oversize_body_is_413_counted_and_not_published(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    big = codec.dumps({**CALL, "custom_fields": {"blob": "x" * settings.max_body_bytes}})
    response = await client.post("/roistat/tok-acme/call-start", data=big)
    assert response.status == 413
    assert "65536" in (await response.json())["error"]
    for queue in settings.topology.work_queues:
        assert await drain(amqp, queue) == []
    metrics = await (await client.get("/metrics")).text()
    assert "callpipe_ingress_oversize_total 1.0" in metrics


async def test_oversize_chunked_body_without_content_length_is_413(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    response = await client.post("/roistat/tok-acme/call-start", data=chunks())
    assert response.status == 413
    for queue in settings.topology.work_queues:
        assert await drain(amqp, queue) == []
    metrics = await (await client.get("/metrics")).text()
    assert "callpipe_ingress_oversize_total 1.0" in metrics


@pytest.mark.parametrize(
    ("body", "status", "reason", "says"),
    [
        (b"", 400, "not_json", "empty"),
        (b"id=100500&caller=7999", 400, "not_json", "not JSON"),
        (b'{"id": "1", "city": "\xff\xfe"}', 400, "not_utf8", "UTF-8"),
        (b"[" * 3000 + b"]" * 3000, 400, "too_deep", "deeper"),
        (b'[{"id": "1"}]', 422, "not_object", "array"),
        (b'"just text"', 422, "not_object", "string"),
        (b'{"caller": "79990009911"}', 422, "missing_id", '"id"'),
        (b'{"id": ""}', 422, "missing_id", '"id"'),
        (b'{"id": true}', 422, "missing_id", '"id"'),
        (b'{"id": "' + b"7" * 200 + b'"}', 422, "id_too_long", "128 bytes"),
    ],
)
async def test_rejected_body_gets_a_json_error_and_is_kept_in_rejected(
    client: Client,
    settings: Settings,
    amqp: AbstractRobustConnection,
    body: bytes,
    status: int,
    reason: str,
    says: str,
) -> None:
    response = await client.post("/roistat/tok-acme/call-end", data=body)
    assert response.status == status
    assert says in (await response.json())["error"]

    [kept] = await drain(amqp, settings.topology.rejected_queue)
    assert kept.body == body
    headers = plain_headers(kept.headers)
    assert headers["x-callpipe-reject-reason"] == reason
    assert headers["x-callpipe-project"] == "acme"
    assert headers["x-callpipe-kind"] == "end"
    assert await drain(amqp, settings.topology.call_queue("end")) == []


async def test_unroutable_webhook_is_spooled_and_arrives_once_its_queue_is_back(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    async with amqp.channel() as channel:
        await channel.queue_delete(settings.topology.call_queue("start"))
    response = await client.post("/roistat/tok-acme/call-start", data=codec.dumps(CALL))
    assert response.status == 200
    assert await response.json() == {
        "accepted": True,
        "event_id": "acme:100500:start",
        "spooled": True,
    }
    # While the spool holds anything, later webhooks queue up behind it: order is kept.
    response = await client.post("/roistat/tok-acme/call-end", data=codec.dumps(CALL))
    assert (await response.json())["spooled"] is True

    found: list[AbstractIncomingMessage] = []

    async def both_arrived() -> bool:
        # The drainer declares the topology again, so the deleted queue comes back.
        for kind in ("start", "end"):
            await take_queued(settings.amqp_url, settings.topology.call_queue(kind), found)
        return len(found) == 2

    await wait_for(both_arrived, seconds=20, what="both webhooks drained from the spool")
    assert sorted(m.message_id or "" for m in found) == ["acme:100500:end", "acme:100500:start"]
    assert all(m.body == codec.dumps(CALL) for m in found)


async def make_call_start_queue_small(amqp: AbstractRobustConnection, topology: Topology) -> None:
    """Replace `{ns}.call-start` with a quorum queue of one message that refuses more
    (x-overflow=reject-publish): the broker nacks a publish to it while it is full."""
    async with amqp.channel() as channel:
        await channel.queue_delete(topology.call_queue("start"))
        small = await channel.declare_queue(
            topology.call_queue("start"),
            durable=True,
            arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
        )
        await small.bind(topology.webhooks_exchange, "*.call.start")


async def test_a_nacked_publish_is_spooled_and_every_200_arrives(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    """A full queue (x-overflow=reject-publish) nacks: the spool holds what it refused."""
    topology: Topology = settings.topology
    await make_call_start_queue_small(amqp, topology)
    answers = []
    for n in range(4):
        body = codec.dumps({**CALL, "id": str(n)})
        response = await client.post("/roistat/tok-acme/call-start", data=body)
        answers.append((response.status, (await response.json()).get("spooled", False)))
    assert [status for status, _ in answers] == [200] * 4
    assert any(spooled for _, spooled in answers)
    taken: list[AbstractIncomingMessage] = []

    async def all_received() -> bool:  # taking one makes room for the next
        await take_queued(settings.amqp_url, topology.call_queue("start"), taken)
        return len(taken) >= 4

    await wait_for(all_received, seconds=30, what="every accepted webhook in the queue")
    assert sorted({m.message_id or "" for m in taken}) == [f"acme:{n}:start" for n in range(4)]


async def test_a_refused_head_of_the_spool_is_tried_alone(
    client: Client,
    settings: Settings,
    amqp: AbstractRobustConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the broker refuses the spool's oldest webhook (its queue is full), the drainer
    does not send the webhooks behind it again every round: each reaches its queue at most
    twice (once in the round that found the refusal, once after), not once per round."""
    topology: Topology = settings.topology
    await make_call_start_queue_small(amqp, topology)
    async with amqp.channel() as channel:
        exchange = await channel.get_exchange(topology.webhooks_exchange)
        fillers = 0
        while fillers < 5:  # until the queue refuses one: a quorum queue may take one more
            try:
                await exchange.publish(aio_pika.Message(b"{}", message_id="filler"), "x.call.start")
            except aio_pika.exceptions.DeliveryError:
                break
            fillers += 1
    head = await client.post("/roistat/tok-acme/call-start", data=codec.dumps(CALL))
    assert (await head.json())["spooled"] is True  # the full queue refused it
    for n in range(5):
        body = codec.dumps({**CALL, "id": str(n)})
        response = await client.post("/roistat/tok-acme/call-end", data=body)
        assert (await response.json())["spooled"] is True  # behind the refused one
    caplog.clear()

    async def refused_four_more_times() -> bool:
        return caplog.text.count("spool drain paused") >= 4

    await wait_for(refused_four_more_times, seconds=20, what="the head refused four more rounds")
    async with amqp.channel() as channel:
        ends = await channel.declare_queue(topology.call_queue("end"), passive=True)
        assert (ends.declaration_result.message_count or 0) <= 5
    taken = await drain(amqp, topology.call_queue("start"))  # room for the head
    assert [m.message_id for m in taken] == ["filler"] * fillers
    spool = client.app[SPOOL]

    async def drained() -> bool:
        return not spool.messages

    await wait_for(drained, seconds=20, what="the spool drained once the head went through")
    [start] = await drain(amqp, topology.call_queue("start"))
    assert start.message_id == "acme:100500:start"
    end_ids = [m.message_id for m in await drain(amqp, topology.call_queue("end"))]
    assert set(end_ids) == {f"acme:{n}:end" for n in range(5)}
    assert all(end_ids.count(event_id) <= 2 for event_id in set(end_ids))


async def test_health_ready_and_metrics(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    await client.post("/roistat/tok-acme/call-start", data=codec.dumps(CALL))
    await client.post("/roistat/nope/call-start", data=codec.dumps(CALL))
    text = await (await client.get("/metrics")).text()
    assert (
        'callpipe_ingress_requests_total{route="/roistat/{token}/call-start",status="200"} 1.0'
        in text
    )
    assert 'status="404"' in text
    assert "tok-acme" not in text
    assert 'callpipe_ingress_publish_seconds_count{outcome="confirmed"} 1.0' in text


async def test_wrong_method_and_unknown_path_answer_json(client: Client) -> None:
    response = await client.get("/roistat/tok-acme/call-start")
    assert response.status == 405
    assert "error" in await response.json()
    response = await client.post("/nowhere")
    assert response.status == 404
    assert "error" in await response.json()


async def test_concurrent_webhooks_each_get_their_own_confirm(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    bodies = [codec.dumps({**CALL, "id": str(n)}) for n in range(200)]
    responses = await asyncio.gather(
        *(client.post("/roistat/tok-acme/call-start", data=body) for body in bodies)
    )
    assert [r.status for r in responses] == [200] * 200

    async def all_queued() -> list[AbstractIncomingMessage]:
        async with amqp.channel() as channel:
            queue = await channel.declare_queue(settings.topology.call_queue("start"), passive=True)
            count = queue.declaration_result.message_count
        return await drain(amqp, settings.topology.call_queue("start")) if count == 200 else []

    queued = await wait_for(all_queued, what="200 messages queued")
    assert sorted(m.body for m in queued) == sorted(bodies)


def mutated_bodies(seed: int, count: int) -> list[bytes]:
    """Valid webhooks damaged the ways networks and senders damage them: cut short, bytes
    flipped or inserted, wrapped, doubled. Deterministic, so a failure can be replayed."""
    rng = random.Random(seed)
    bodies = []
    for n in range(count):
        body = bytearray(codec.dumps({**CALL, "id": f"fuzz-{n}", "city": "Москва"}))
        for _ in range(rng.randint(0, 3)):
            where = rng.randrange(len(body))
            match rng.randrange(5):
                case 0:
                    del body[where:]
                case 1:
                    body[where] = rng.randrange(256)
                case 2:
                    body.insert(where, rng.choice(b'{}[]",:\\\x00\xff'))
                case 3:
                    body = bytearray(b"[" + body + b"]")
                case _:
                    body = body + body
        bodies.append(bytes(body))
    return bodies


async def test_damaged_bodies_never_500_and_every_answer_matches_a_queue(
    client: Client, settings: Settings, amqp: AbstractRobustConnection
) -> None:
    bodies = mutated_bodies(seed=20261125, count=300)
    statuses = []
    for body in bodies:
        response = await client.post("/roistat/tok-acme/call-start", data=body)
        statuses.append(response.status)
        assert "error" in await response.json() or response.status == 200
    assert set(statuses) <= {200, 400, 422}, sorted(set(statuses))
    assert {200, 400, 422} <= set(statuses), "the mutations should produce every outcome"
    accepted = await drain(amqp, settings.topology.call_queue("start"))
    rejected = await drain(amqp, settings.topology.rejected_queue)
    assert len(accepted) == statuses.count(200)
    assert len(rejected) == statuses.count(400) + statuses.count(422)
    # Accepted bodies are the same bytes as sent, and a duplicate id is still accepted.
    sent_ok = sorted(body for body, status in zip(bodies, statuses, strict=True) if status == 200)
    assert sorted(message.body for message in accepted) == sent_ok


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_broken_compressed_body_is_a_clear_400_not_a_500(
    client: Client,
    settings: Settings,
    amqp: AbstractRobustConnection,
    encoding: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await client.post(
        "/roistat/tok-acme/call-start",
        data=b"\x00\x01 this is not compressed",
        headers={"Content-Encoding": encoding},
    )
    assert response.status == 400
    assert await response.json() == {"error": f"the body is not valid {encoding} data"}
    assert "Traceback" not in caplog.text and "Unhandled exception" not in caplog.text
    (kept,) = await drain(amqp, settings.topology.rejected_queue)
    assert plain_headers(kept.headers)["x-callpipe-reject-reason"] == "bad_encoding"
    text = await (await client.get("/metrics")).text()
    assert 'callpipe_ingress_rejected_total{reason="bad_encoding"} 1.0' in text
    body = gzip.compress(codec.dumps(CALL))  # a good one still works
    response = await client.post(
        "/roistat/tok-acme/call-start", data=body, headers={"Content-Encoding": "gzip"}
    )
    assert response.status == 200


async def test_an_unexpected_error_is_a_counted_json_500(settings: Settings) -> None:
    app = init_app(settings)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_post("/broken", broken)  # stands for any handler with a bug
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.post("/broken")
        assert response.status == 500
        assert await response.json() == {"error": "internal error"}
        text = await (await test_client.get("/metrics")).text()
        assert 'callpipe_ingress_requests_total{route="/broken",status="500"} 1.0' in text
