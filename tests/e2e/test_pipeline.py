"""Webhooks through the ingress and both workers into PostgreSQL rows and events."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from aiohttp.test_utils import TestClient
from callpipe_testing import wait_for
from conftest import Collector, Workers

from infra.settings import Settings
from schemas import codec

Client = TestClient[Any, Any]

START = {
    "id": "9001",
    "caller": "79990009911",
    "callee": "74951234567",
    "date": "2026-11-25 10:00:00",
    "visit_id": 123456,
    "order_id": "",
    "marker": "yandex_brand",
    "city": "Москва",
    "country": "Россия",
    "utm_source": "yandex",
    "custom_fields": {"менеджер": "Анна"},
    "landing_page": "https://shop.example/каталог",
}
END = {**START, "status": "ANSWER", "duration": "35", "file_id": 777, "link": "https://r/777.mp3"}


async def post(client: Client, kind: str, document: dict[str, Any], token: str = "tok-acme") -> str:
    response = await client.post(f"/roistat/{token}/call-{kind}", data=codec.dumps(document))
    assert response.status == 200, await response.text()
    event_id: str = (await response.json())["event_id"]
    return event_id


async def call_row(db: asyncpg.Pool, settings: Settings, call_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow(
        f'SELECT * FROM "{settings.namespace}".calls WHERE project = $1 AND call_id = $2',
        "acme",
        call_id,
    )
    return dict(row) if row else None


async def wait_row(
    db: asyncpg.Pool, settings: Settings, call_id: str, *, ended: bool = True
) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        row = await call_row(db, settings, call_id)
        if row is None or (ended and row["end_received_at"] is None):
            return None
        if not ended and row["start_received_at"] is None:
            return None
        return row

    return await wait_for(ready, what=f"call {call_id} stored")


async def published_count(db: asyncpg.Pool, settings: Settings) -> int:
    count: int = await db.fetchval(
        f'SELECT count(*) FROM "{settings.namespace}".call_events WHERE published_at IS NOT NULL'
    )
    return count


async def test_start_then_end_gives_one_merged_row_and_two_events(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    await post(client, "start", START)
    await wait_row(db, settings, "9001", ended=False)
    await post(client, "end", END)
    row = await wait_row(db, settings, "9001")

    assert row["caller"] == "+79990009911"
    assert row["callee"] == "+74951234567"
    assert row["called_at"].isoformat() == "2026-11-25T07:00:00+00:00"  # Moscow is UTC+3
    assert (row["status"], row["outcome"], row["is_missed"]) == ("ANSWER", "answered", False)
    assert row["duration_s"] == 35
    assert row["recording_url"] == "https://r/777.mp3"
    assert (row["file_id"], row["visit_id"], row["order_id"]) == ("777", "123456", None)
    assert row["city"] == "Москва"
    assert row["landing_page"] == "https://shop.example/каталог"
    assert codec.loads(row["custom_fields"]) == {"менеджер": "Анна"}
    assert row["caller_region"] and row["caller_carrier"]
    assert (row["is_repeat_caller"], row["previous_calls"]) == (False, 0)

    await wait_for(lambda: _at_least(events, 2), what="two events")
    by_type = {event["type"]: event for event in events.bodies()}
    assert set(by_type) == {"call.started", "call.ended"}
    ended = by_type["call.ended"]
    assert ended["event_id"] == "acme:9001:end"
    assert ended["schema"] == "callpipe.call.v1"
    assert ended["project"] == "acme"
    assert ended["occurred_at"] == "2026-11-25T07:00:00Z"
    assert ended["call"]["outcome"] == "answered"
    assert ended["call"]["caller"] == "+79990009911"
    assert ended["raw"] == codec.loads(codec.dumps(END))
    routing_keys = sorted(message.routing_key or "" for message in events.messages)
    assert routing_keys == ["call.ended.answered", "call.started"]
    assert {m.message_id for m in events.messages} == {"acme:9001:start", "acme:9001:end"}


async def _at_least(events: Collector, n: int) -> bool:
    return len(events.messages) >= n


async def test_end_before_start_gives_the_same_row_as_start_before_end(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers
) -> None:
    workers.start_both(settings)
    await post(client, "start", {**START, "id": "in-order"})
    await wait_row(db, settings, "in-order", ended=False)
    await post(client, "end", {**END, "id": "in-order", "city": "", "marker": "from-the-end"})
    await post(client, "end", {**END, "id": "reversed", "city": "", "marker": "from-the-end"})
    await wait_row(db, settings, "reversed")
    await post(client, "start", {**START, "id": "reversed"})
    in_order = await wait_row(db, settings, "in-order")
    reversed_ = await wait_row(db, settings, "reversed", ended=False)
    volatile = {"call_id", "start_received_at", "end_received_at", "updated_at"}
    assert {k: v for k, v in in_order.items() if k not in volatile} == {
        k: v for k, v in reversed_.items() if k not in volatile
    }
    # The end's empty city did not erase the start's; its marker won over the start's.
    assert reversed_["city"] == "Москва"
    assert in_order["marker"] == reversed_["marker"] == "from-the-end"
    # Each half's arrival time is its own.
    assert in_order["start_received_at"] < in_order["end_received_at"]
    assert reversed_["end_received_at"] < reversed_["start_received_at"]


async def test_the_same_webhook_three_times_is_one_row_and_one_event(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
    amqp: AbstractRobustConnection,
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    for _ in range(3):
        assert await post(client, "end", END) == "acme:9001:end"
    await wait_row(db, settings, "9001")

    await wait_for(lambda: _at_least(events, 1), what="the event")
    # A graceful stop acks what is in flight: an empty queue after it means all 3 were consumed.
    await workers.stop_all()
    await events.settle(amqp, settings.topology.events_exchange, "call.ended.answered")
    assert await _queues_empty(settings)
    stored = await db.fetchval(f'SELECT count(*) FROM "{settings.namespace}".call_events')
    assert stored == 1
    assert [m.message_id for m in events.messages] == ["acme:9001:end"]
    assert await published_count(db, settings) == 1


async def _queues_empty(settings: Settings) -> bool:
    from infra.broker import connect

    connection = await connect(settings.amqp_url, name="test-inspect")
    async with connection, connection.channel() as channel:
        for kind in ("start", "end"):
            queue = await channel.declare_queue(settings.topology.call_queue(kind), passive=True)
            if queue.declaration_result.message_count:
                return False
    return True


async def test_only_an_end_unknown_status_and_cyrillic(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    unknown: Collector = await subscribe(settings.topology.events_exchange, "call.ended.unknown")
    workers.start_both(settings)
    await post(
        client,
        "end",
        {
            "id": "only-end",
            "caller": "8 (999) 000-99-11",
            "status": "VOICEMAIL",
            "duration": 0,
            "utm_campaign": "осень_скидки",
            "date": "2026-11-25 23:30:00",
        },
    )
    row = await wait_row(db, settings, "only-end")
    assert row["start_received_at"] is None
    assert (row["status"], row["outcome"], row["is_missed"]) == ("VOICEMAIL", "unknown", False)
    assert row["caller"] == "+79990009911"
    assert row["utm_campaign"] == "осень_скидки"
    assert row["called_at"].isoformat() == "2026-11-25T20:30:00+00:00"
    await wait_for(lambda: _at_least(unknown, 1), what="the call.ended.unknown event")
    assert unknown.bodies()[0]["call"]["status"] == "VOICEMAIL"


async def test_missed_call_reaches_a_missed_call_subscriber_only(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    missed: Collector = await subscribe(settings.topology.events_exchange, "call.ended.missed")
    workers.start_both(settings)
    await post(client, "end", {**END, "id": "answered"})
    await post(client, "end", {**END, "id": "missed", "status": "NOANSWER", "duration": 0})
    await wait_row(db, settings, "answered")
    row = await wait_row(db, settings, "missed")
    assert (row["outcome"], row["is_missed"]) == ("missed", True)
    await wait_for(lambda: _at_least(missed, 1), what="the missed-call event")
    assert await wait_for(lambda: _published(db, settings, 2), what="both events published")
    assert [m.message_id for m in missed.messages] == ["acme:missed:end"]


async def _published(db: asyncpg.Pool, settings: Settings, n: int) -> bool:
    return await published_count(db, settings) >= n


async def test_repeat_caller_counts_earlier_calls_within_30_days(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers
) -> None:
    workers.start_both(settings)
    calls = [
        ("first", "2026-10-01 10:00:00"),
        ("second", "2026-10-20 10:00:00"),
        ("third", "2026-10-25 10:00:00"),
        ("much-later", "2026-12-31 10:00:00"),
    ]
    for call_id, date in calls:
        await post(client, "start", {**START, "id": call_id, "date": date})
        await wait_row(db, settings, call_id, ended=False)
    # Inside the window of "third", but another number, or another project.
    await post(
        client,
        "start",
        {**START, "id": "other-caller", "caller": "79990001122", "date": "2026-10-26 10:00:00"},
    )
    await post(
        client, "start", {**START, "id": "other-project", "date": "2026-10-26 10:00:00"}, "tok-beta"
    )
    counts = {}
    for call_id, _ in calls:
        row = await wait_row(db, settings, call_id, ended=False)
        counts[call_id] = (row["previous_calls"], row["is_repeat_caller"])
    assert counts == {
        "first": (0, False),
        "second": (1, True),
        "third": (2, True),
        "much-later": (0, False),
    }
    other = await wait_row(db, settings, "other-caller", ended=False)
    assert other["previous_calls"] == 0

    async def beta_row() -> Any:
        return await db.fetchrow(
            f'SELECT previous_calls FROM "{settings.namespace}".calls WHERE project = $1', "beta"
        )

    assert (await wait_for(beta_row, what="the other project's call"))["previous_calls"] == 0
    # A call that would change the count arrives late: the stored count is not redone.
    await post(client, "start", {**START, "id": "late", "date": "2026-10-22 10:00:00"})
    await wait_row(db, settings, "late", ended=False)
    await post(client, "end", {**END, "id": "third", "date": "2026-10-25 10:00:00"})
    assert (await wait_row(db, settings, "third"))["previous_calls"] == 2


async def test_many_calls_each_stored_once_with_one_event_per_kind(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    statuses = ["ANSWER", "NOANSWER", "BUSY", "CANCEL", "CONGESTION", "DONTCALL", "WEIRD"]
    expected_outcomes = {}
    webhooks = []
    for n in range(70):
        status = statuses[n % len(statuses)]
        call = {**START, "id": f"bulk-{n}", "caller": f"7999{n:07d}"}
        webhooks += [("start", call), ("end", {**call, "status": status, "duration": n})]
        if n % 5 == 0:
            webhooks.append(("end", {**call, "status": status, "duration": n}))  # Roistat resends
        expected_outcomes[f"bulk-{n}"] = status
    await asyncio.gather(*(post(client, kind, doc) for kind, doc in webhooks))

    async def all_ended() -> bool:
        return bool(
            await db.fetchval(
                f'SELECT count(*) FROM "{settings.namespace}".calls'
                " WHERE end_received_at IS NOT NULL AND start_received_at IS NOT NULL"
            )
            == 70
        )

    await wait_for(all_ended, seconds=30, what="70 merged calls")
    await wait_for(lambda: _at_least(events, 140), seconds=30, what="140 events")
    rows = await db.fetch(f'SELECT call_id, status FROM "{settings.namespace}".calls')
    assert {r["call_id"]: r["status"] for r in rows} == expected_outcomes
    ids = [m.message_id for m in events.messages]
    assert len(ids) == len(set(ids)) == 140


async def test_a_nul_character_postgresql_cannot_store_does_not_lose_the_call(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers
) -> None:
    workers.start_both(settings)
    await post(client, "end", {**END, "id": "nul", "city": "Мос\x00ква", "x\x00": ["\x00"]})
    row = await wait_row(db, settings, "nul")
    assert row["city"] == "Мос\ufffdква"
    payload = await db.fetchval(
        f'SELECT payload FROM "{settings.namespace}".call_events WHERE event_id = $1',
        "acme:nul:end",
    )
    assert codec.loads(payload)["x\ufffd"] == ["\ufffd"]


async def test_repeat_count_waits_for_the_half_that_brings_caller_and_time(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers
) -> None:
    workers.start_both(settings)
    await post(client, "start", {**START, "id": "earlier", "date": "2026-11-01 10:00:00"})
    await wait_row(db, settings, "earlier", ended=False)
    # A start without caller or date, then the end that has them.
    await post(client, "start", {"id": "later", "city": "Казань"})
    await wait_row(db, settings, "later", ended=False)
    await post(client, "end", {**END, "id": "later", "date": "2026-11-02 10:00:00"})
    row = await wait_row(db, settings, "later")
    assert (row["previous_calls"], row["is_repeat_caller"]) == (1, True)
