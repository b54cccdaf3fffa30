"""The event is the whole truth: `call` is the merged `calls` row after the webhook, with its
revision, whatever order the two halves of a call arrive in."""

from __future__ import annotations

from typing import Any

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from aiohttp.test_utils import TestClient
from callpipe_testing import wait_for
from conftest import Collector, Workers

from infra.settings import Settings
from schemas import codec
from schemas.events import CallFields

Client = TestClient[Any, Any]

START: dict[str, Any] = {
    "id": "merge-1",
    "caller": "79990009911",
    "callee": "74951234567",
    "date": "2026-11-25 10:00:00",
    "marker": "yandex_brand",
    "city": "Москва",
    "custom_fields": {"менеджер": "Анна"},
    "first_visit": "2026-11-20 09:15:00",
    "roistat_param_1": "акция",
    "roistat_param_2": "from-the-start",
    "roistat_param_3": 42,
    "roistat_param_4": "  padded  ",
    "roistat_param_5": "",
}
# Only what a call end adds, plus one parameter that wins and one empty that must not erase.
END: dict[str, Any] = {
    "id": "merge-1",
    "status": "NOANSWER",
    "duration": "0",
    "link": "https://r/1.mp3",
    "roistat_param_1": "",
    "roistat_param_2": "from-the-end",
}


async def post(client: Client, kind: str, document: dict[str, Any]) -> None:
    response = await client.post(f"/roistat/tok-acme/call-{kind}", data=codec.dumps(document))
    assert response.status == 200, await response.text()


async def stored_row(db: asyncpg.Pool, settings: Settings, call_id: str) -> dict[str, Any]:
    row = await db.fetchrow(
        f'SELECT * FROM "{settings.namespace}".calls WHERE project = $1 AND call_id = $2',
        "acme",
        call_id,
    )
    assert row is not None
    return dict(row)


def as_event_call(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the event's `call` shows it (this pool has no jsonb codec)."""
    public = {name: row[name] for name in CallFields.model_fields}
    if public["custom_fields"] is not None:
        public["custom_fields"] = codec.loads(public["custom_fields"])
    return CallFields.model_validate(public).model_dump(mode="json")


async def events_by_type(events: Collector, n: int) -> dict[str, dict[str, Any]]:
    async def arrived() -> bool:
        return len(events.messages) >= n

    await wait_for(arrived, what=f"{n} events")
    return {event["type"]: event for event in events.bodies()}


async def wait_published(db: asyncpg.Pool, settings: Settings, event_id: str) -> None:
    async def published() -> bool:
        return bool(
            await db.fetchval(
                f'SELECT published_at IS NOT NULL FROM "{settings.namespace}".call_events'
                " WHERE event_id = $1",
                event_id,
            )
        )

    await wait_for(published, what=f"{event_id} published")


async def test_a_start_processed_after_the_end_carries_the_end_and_revision_2(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    await post(client, "end", END)
    await wait_published(db, settings, "acme:merge-1:end")
    await post(client, "start", START)
    by_type = await events_by_type(events, 2)

    ended, started = by_type["call.ended"]["call"], by_type["call.started"]["call"]
    assert ended["revision"] == 1
    assert (ended["status"], ended["outcome"], ended["caller"]) == ("NOANSWER", "missed", None)
    assert ended["end_received_at"] is not None
    assert ended["start_received_at"] is None

    # Older news arriving later: revision 2 says so, and it holds the end's result.
    assert started["revision"] == 2
    assert (started["status"], started["outcome"], started["is_missed"]) == (
        "NOANSWER",
        "missed",
        True,
    )
    assert (started["duration_s"], started["recording_url"]) == (0, "https://r/1.mp3")
    assert started["caller"] == "+79990009911"
    assert started["end_received_at"] == ended["end_received_at"]
    assert started["start_received_at"] is not None
    assert started == as_event_call(await stored_row(db, settings, "merge-1"))
    assert by_type["call.started"]["occurred_at"] == "2026-11-25T07:00:00Z"
    routing_keys = sorted(message.routing_key or "" for message in events.messages)
    assert routing_keys == ["call.ended.missed", "call.started"]


async def test_an_end_after_the_start_carries_the_start_and_revision_2(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    await post(client, "start", START)
    await wait_published(db, settings, "acme:merge-1:start")
    await post(client, "end", END)
    by_type = await events_by_type(events, 2)

    started, ended = by_type["call.started"]["call"], by_type["call.ended"]["call"]
    assert started["revision"] == 1
    assert (started["status"], started["outcome"], started["end_received_at"]) == (
        None,
        None,
        None,
    )
    assert ended["revision"] == 2
    # The end's webhook has no caller, city or custom fields: the event has the start's.
    assert ended["caller"] == "+79990009911"
    assert (ended["city"], ended["marker"]) == ("Москва", "yandex_brand")
    assert ended["custom_fields"] == {"менеджер": "Анна"}
    assert ended["outcome"] == "missed"
    assert ended["start_received_at"] == started["start_received_at"]
    assert ended == as_event_call(await stored_row(db, settings, "merge-1"))
    assert by_type["call.ended"]["occurred_at"] == "2026-11-25T07:00:00Z"


async def test_roistat_params_and_first_visit_are_columns_and_in_the_event(
    client: Client, settings: Settings, db: asyncpg.Pool, workers: Workers, subscribe: Any
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    await post(client, "start", START)
    await wait_published(db, settings, "acme:merge-1:start")
    await post(client, "end", END)
    by_type = await events_by_type(events, 2)
    row = await stored_row(db, settings, "merge-1")

    expected = {
        "first_visit": "2026-11-20 09:15:00",
        "roistat_param_1": "акция",  # the end's empty value does not erase it
        "roistat_param_2": "from-the-end",  # the end's non-empty value wins
        "roistat_param_3": "42",
        "roistat_param_4": "padded",
        "roistat_param_5": None,
    }
    assert {name: row[name] for name in expected} == expected
    assert row["revision"] == 2
    ended = by_type["call.ended"]["call"]
    assert {name: ended[name] for name in expected} == expected
    started = by_type["call.started"]["call"]
    assert started["roistat_param_2"] == "from-the-start"


async def test_duplicates_publish_nothing_new_and_keep_the_revision(
    client: Client,
    settings: Settings,
    db: asyncpg.Pool,
    workers: Workers,
    subscribe: Any,
    amqp: AbstractRobustConnection,
) -> None:
    events: Collector = await subscribe(settings.topology.events_exchange, "call.#")
    workers.start_both(settings)
    await post(client, "start", START)
    await wait_published(db, settings, "acme:merge-1:start")
    await post(client, "end", END)
    await wait_published(db, settings, "acme:merge-1:end")
    before = await stored_row(db, settings, "merge-1")
    for _ in range(2):
        await post(client, "start", START)
        await post(client, "end", END)

    # A graceful stop acks what is in flight: empty queues after it mean every copy was consumed.
    await workers.stop_all()
    for kind in ("start", "end"):
        assert await ready_messages(amqp, settings.topology.call_queue(kind)) == 0
    await events.settle(amqp, settings.topology.events_exchange, "call.started")
    assert sorted(m.message_id or "" for m in events.messages) == [
        "acme:merge-1:end",
        "acme:merge-1:start",
    ]
    after = await stored_row(db, settings, "merge-1")
    assert after == before
    assert after["revision"] == 2


async def ready_messages(amqp: AbstractRobustConnection, queue_name: str) -> int:
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(queue_name, passive=True)
        count: int = queue.declaration_result.message_count or 0
        return count
