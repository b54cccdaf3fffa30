"""Telegram missed-call alerts against a local fake of the Bot API; broker and database real."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from aiohttp.test_utils import TestClient
from callpipe_testing import wait_for
from conftest import Workers
from sink_testing import FakeServer, RunningSinks, envelope, publish_events

from infra.broker import plain_headers
from infra.settings import Settings
from schemas import codec
from sinks.alerts import AlertKey, AlertStore, Claim, Held
from sinks.telegram import BotApi, TelegramSinkConfig
from workers.storage import create_pool

TOKEN = "123456:TEST-token"


class FakeBotApi:
    """Records the chat as Telegram would show it; a script can refuse or stall calls."""

    def __init__(self) -> None:
        self.chat: dict[int, str] = {}  # message_id -> current text
        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.script: list[str] = []  # for sendMessage: "429", "hang", "ok"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        prefix = f"/bot{TOKEN}/"
        if not request.path.startswith(prefix):
            return web.json_response({"ok": False, "error_code": 401}, status=401)
        method = request.path.removeprefix(prefix)
        payload = await request.json()
        self.calls.append((method, payload, time.monotonic()))
        if method == "sendMessage":
            step = self.script.pop(0) if self.script else "ok"
            if step == "429":
                answer = {
                    "ok": False,
                    "error_code": 429,
                    "description": "Too Many Requests",
                    "parameters": {"retry_after": 1},
                }
                return web.json_response(answer, status=429)
            message_id = len(self.chat) + 1
            self.chat[message_id] = payload["text"]
            if step == "hang":  # posted, but the answer never comes in time
                await asyncio.sleep(3)
            return web.json_response({"ok": True, "result": {"message_id": message_id}})
        if method == "editMessageText":
            if self.chat.get(payload["message_id"]) == payload["text"]:
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": 400,
                        "description": "Bad Request: message is not modified",
                    },
                    status=400,
                )
            self.chat[payload["message_id"]] = payload["text"]
            return web.json_response({"ok": True, "result": {"message_id": payload["message_id"]}})
        return web.json_response({"ok": False, "error_code": 404}, status=404)

    def sent(self) -> list[dict[str, Any]]:
        return [payload for method, payload, _ in self.calls if method == "sendMessage"]


@pytest.fixture
async def bot() -> AsyncIterator[tuple[FakeBotApi, str]]:
    fake = FakeBotApi()
    server = FakeServer(fake.handle)
    url = await server.start()
    try:
        yield fake, url
    finally:
        await server.stop()


@pytest.fixture
async def sinks(amqp: AbstractRobustConnection) -> AsyncIterator[RunningSinks]:
    running = RunningSinks(amqp)
    try:
        yield running
    finally:
        await running.remove()


def telegram(api_base: str, **overrides: Any) -> TelegramSinkConfig:
    values = {
        "name": "missed",
        "bot_token": TOKEN,
        "chat_id": -100123,
        "api_base": api_base,
        "retry_delays_s": [0.2],
        "timeout_s": 0.5,
        "callback_window_min": 120,
    }
    return TelegramSinkConfig.model_validate({**values, **overrides})


async def post(client: TestClient[Any, Any], kind: str, document: dict[str, Any]) -> None:
    response = await client.post(f"/roistat/tok-acme/call-{kind}", data=codec.dumps(document))
    assert response.status == 200, await response.text()


CALL = {
    "caller": "79990009911",
    "callee": "74951234567",
    "source_level_1": "Яндекс.Директ",
    "source_level_2": "brand",
    "landing_page": "https://shop.example/sale",
}


async def test_one_alert_per_missed_call_and_the_callback_follows_it_up(
    client: TestClient[Any, Any],
    settings: Settings,
    amqp: AbstractRobustConnection,
    workers: Workers,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, url = bot
    caplog.set_level(logging.INFO)
    await sinks.start(settings, [telegram(url)])
    workers.start_both(settings)
    missed = {"id": "m1", "date": "2026-11-25 10:00:00", **CALL}
    await post(client, "start", missed)
    await post(client, "end", {**missed, "status": "NOANSWER", "duration": 0})
    await post(client, "end", {**missed, "status": "NOANSWER", "duration": 0})  # Roistat resends

    async def alerted() -> bool:
        return len(fake.chat) == 1

    await wait_for(alerted, what="the alert")
    text = fake.chat[1]
    for part in (
        "Missed call",
        "+79990009911",
        "+74951234567",
        "25.11.2026 10:00 (Europe/Moscow)",
        "Яндекс.Директ / brand",
        "https://shop.example/sale",
        "acme",
    ):
        assert part in text, (part, text)
    assert fake.sent()[0]["chat_id"] == "-100123"

    # The same event again (a duplicate from a crash window): nothing new in the chat.
    stored = envelope("m1", caller="+79990009911")
    await publish_events(amqp, settings, [stored])
    # Another caller's missed call behind it, as a marker: one queue, one at a time.
    await post(
        client,
        "end",
        {"id": "m2", "date": "2026-11-25 10:05:00", "caller": "79161112233", "status": "BUSY"},
    )

    async def marker_alerted() -> bool:
        return len(fake.chat) == 2

    await wait_for(marker_alerted, what="the marker's alert")
    assert len(fake.sent()) == 2

    # The first caller gets through 20 minutes later: the alert is edited.
    answered = {"id": "a1", "date": "2026-11-25 10:20:00", **CALL}
    await post(client, "end", {**answered, "status": "ANSWER", "duration": 95})

    async def followed_up() -> bool:
        return "Reached" in fake.chat[1]

    await wait_for(followed_up, what="the follow-up")
    assert "10:20" in fake.chat[1] and "talked 1:35" in fake.chat[1]
    assert "Reached" not in fake.chat[2]  # another caller's alert stays open
    assert len(fake.sent()) == 2
    logs = caplog.text
    assert "+79990009911" not in logs and "9990009911" not in logs


async def test_a_callback_outside_the_window_changes_nothing(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
) -> None:
    fake, url = bot
    await sinks.start(settings, [telegram(url, callback_window_min=30)])
    late = envelope("w2", outcome="answered", called_at="2026-11-25T08:00:00Z")
    await publish_events(amqp, settings, [envelope("w1"), late, envelope("w3", caller="+7916")])

    async def both_alerts() -> bool:
        return len(fake.chat) == 2

    await wait_for(both_alerts, what="two alerts")
    assert not [call for call in fake.calls if call[0] == "editMessageText"]
    state = await db.fetchval(
        f'SELECT followed_up_by FROM "{settings.namespace}".telegram_alerts WHERE call_id = $1',
        "w1",
    )
    assert state is None


async def test_telegrams_retry_after_is_honoured(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
) -> None:
    fake, url = bot
    fake.script = ["429"]
    await sinks.start(settings, [telegram(url)])
    await publish_events(amqp, settings, [envelope("t1")])

    async def alerted() -> bool:
        return len(fake.chat) == 1

    await wait_for(alerted, what="the alert after the 429")
    attempts = [at for method, _, at in fake.calls if method == "sendMessage"]
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 1.0  # retry_after was 1 s; the schedule alone is 0.2 s


async def test_an_alert_that_may_have_arrived_is_never_sent_twice(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
) -> None:
    fake, url = bot
    fake.script = ["hang"]  # Telegram posts it, but the answer comes after our timeout
    await sinks.start(settings, [telegram(url)])
    await publish_events(amqp, settings, [envelope("h1")])
    dead: list[Any] = []

    async def dead_lettered() -> bool:
        async with amqp.channel() as channel:
            queue = await channel.get_queue(settings.topology.dead_queue)
            message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            dead.append(message)
        return bool(dead)

    await wait_for(dead_lettered, what="the dead letter")
    reason = plain_headers(dead[0].headers)["x-callpipe-error"]
    assert "may have arrived" in reason
    # The same event again: the state says "unknown", so nothing is sent.
    await publish_events(amqp, settings, [envelope("h1"), envelope("h2")])

    async def marker() -> bool:
        return len(fake.sent()) == 2

    await wait_for(marker, what="the marker's alert")
    assert [payload["text"].count("call h1") for payload in fake.sent()] == [1, 0]
    state = await db.fetchval(
        f'SELECT state FROM "{settings.namespace}".telegram_alerts WHERE call_id = $1', "h1"
    )
    assert state == "unknown"


async def test_an_alert_sent_after_the_callback_says_so_at_once(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
) -> None:
    """The answered call's event came first (or the alert waited out a 429): the stored call
    row tells the alert that the caller got through, so it never sits open in the chat."""
    fake, url = bot
    await db.execute(
        f'INSERT INTO "{settings.namespace}".calls (project, call_id, caller, called_at, outcome,'
        " duration_s) VALUES ('acme', 'back', '+79990009911', '2026-11-25T07:10:00Z',"
        " 'answered', 61)"
    )
    await sinks.start(settings, [telegram(url)])
    await publish_events(amqp, settings, [envelope("early", called_at="2026-11-25T07:00:00Z")])

    async def alerted() -> bool:
        return len(fake.chat) == 1

    await wait_for(alerted, what="the alert")
    assert "Reached" in fake.chat[1] and "10:10" in fake.chat[1] and "talked 1:01" in fake.chat[1]
    followed_up_by = await db.fetchval(
        f'SELECT followed_up_by FROM "{settings.namespace}".telegram_alerts WHERE call_id = $1',
        "early",
    )
    assert followed_up_by == "back"


async def test_a_follow_up_waits_for_an_alert_being_sent(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, url = bot
    fake.chat[1] = "📵 Missed call (sent, its answer not yet noted)"
    table = f'"{settings.namespace}".telegram_alerts'
    await db.execute(
        f"INSERT INTO {table} (sink, project, call_id, caller, called_at, state, claimed_at)"
        " VALUES ('missed', 'acme', 'm9', '+79990009911', '2026-11-25T07:00:00Z', 'sending',"
        " now())"
    )
    await sinks.start(settings, [telegram(url)])
    answered = envelope("a9", outcome="answered", called_at="2026-11-25T07:05:00Z")
    await publish_events(amqp, settings, [answered])

    async def waited() -> bool:
        return "being sent" in caplog.text

    await wait_for(waited, what="the follow-up told to wait")
    await db.execute(
        f"UPDATE {table} SET state = 'sent', chat_id = '-100123', message_id = 1,"
        " alert_text = $1 WHERE call_id = 'm9'",
        fake.chat[1],
    )

    async def edited() -> bool:
        return "Reached" in fake.chat[1]

    await wait_for(edited, what="the follow-up once the alert is noted")


@contextlib.contextmanager
def unreachable_port() -> Iterator[int]:
    """A local port whose connections are never made: its accept queue is full, so the kernel
    drops new SYNs, as a firewall or a dead route would."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.3)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break  # this one hangs: so will the next
        else:
            pytest.fail("could not make a local port that drops connections")
        yield port
    finally:
        for one in (*fillers, server):
            one.close()


async def test_a_bot_api_never_reached_is_not_sent_and_may_be_retried() -> None:
    """Packets dropped on the way to Telegram: no connection, so the alert was surely not
    sent, and is tried again, not abandoned as one that "may have arrived"."""
    with unreachable_port() as port:
        config = telegram(f"http://127.0.0.1:{port}", timeout_s=2.0)
        async with aiohttp.ClientSession() as session:
            answer = await BotApi(config, session).call("sendMessage", {"chat_id": 1, "text": "x"})
    assert (answer.ok, answer.sent, answer.may_retry) == (False, False, True)
    assert answer.error == "network: cannot connect (timed out)"


async def test_a_database_error_before_the_send_leaves_the_alert_to_the_retry(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The alert is claimed, then the database fails before anything is sent: the claim is
    released, so the retry sends it (left claimed, it would read as "may have arrived" once
    its lease is over, and never be sent)."""
    fake, url = bot
    calls = f'"{settings.namespace}".calls'
    await db.execute(f"ALTER TABLE {calls} RENAME TO calls_away")
    try:
        await sinks.start(settings, [telegram(url, retry_delays_s=[0.5])])
        await publish_events(amqp, settings, [envelope("d1")])

        async def failed() -> bool:
            return "database: UndefinedTableError" in caplog.text

        await wait_for(failed, what="the callback lookup failing")
    finally:
        await db.execute(f'ALTER TABLE "{settings.namespace}".calls_away RENAME TO calls')

    async def alerted() -> bool:
        return len(fake.chat) == 1

    await wait_for(alerted, what="the alert sent by the retry")
    assert "call d1" in fake.chat[1]


async def test_a_claim_past_its_lease_does_not_hold_the_callers_follow_ups(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An alert sent but never noted (the database failed after the send) stays claimed;
    once its lease is over, the caller's other alerts are followed up without waiting."""
    fake, url = bot
    fake.chat[1] = "📵 Missed call (sent, and noted)"
    table = f'"{settings.namespace}".telegram_alerts'
    await db.execute(
        f"INSERT INTO {table} (sink, project, call_id, caller, called_at, state, claimed_at,"
        " chat_id, message_id, alert_text, sent_at) VALUES"
        " ('missed', 'acme', 'm1', '+79990009911', '2026-11-25T07:00:00Z', 'sent',"
        "  now() - interval '1 hour', '-100123', 1, $1, now() - interval '1 hour'),"
        " ('missed', 'acme', 'm2', '+79990009911', '2026-11-25T07:01:00Z', 'sending',"
        "  now() - interval '1 hour', NULL, NULL, NULL, NULL)",
        fake.chat[1],
    )
    await sinks.start(settings, [telegram(url)])
    answered = envelope("a1", outcome="answered", called_at="2026-11-25T07:05:00Z")
    await publish_events(amqp, settings, [answered])

    async def edited() -> bool:
        return "Reached" in fake.chat[1]

    await wait_for(edited, what="the noted alert followed up")
    assert "being sent" not in caplog.text


async def test_a_claim_left_before_the_send_is_taken_over_and_sent(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database fails after the claim and stays away while the claim would be released:
    the claim is left behind. Nothing was sent, so once its lease is over a retry takes it
    over and sends the alert, instead of giving it up as one that "may have arrived"."""
    fake, url = bot
    schema = f'"{settings.namespace}"'
    await db.execute(f"ALTER TABLE {schema}.calls RENAME TO calls_away")
    await db.execute(
        f"CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'updates refused by the test'; END $$;"
        f" CREATE TRIGGER refuse_updates BEFORE UPDATE ON {schema}.telegram_alerts"
        f" FOR EACH ROW EXECUTE FUNCTION {schema}.refuse()"
    )
    try:
        config = telegram(url, retry_delays_s=[0.5], max_attempts=100)
        await sinks.start(settings, [config])
        await publish_events(amqp, settings, [envelope("c1")])

        async def left_claimed() -> bool:
            claim_id = await db.fetchval(
                f"SELECT claim_id FROM {schema}.telegram_alerts WHERE call_id = 'c1'"
            )
            return claim_id is not None and "database: UndefinedTableError" in caplog.text

        await wait_for(left_claimed, what="the claim left behind by the failed attempt")
    finally:
        await db.execute(f"DROP TRIGGER IF EXISTS refuse_updates ON {schema}.telegram_alerts")
        await db.execute(f"ALTER TABLE IF EXISTS {schema}.calls_away RENAME TO calls")
    assert fake.sent() == []
    # Retries meanwhile find it claimed (a BEFORE UPDATE trigger fires only on a row that
    # changes, and a claim changes nothing then). Now its lease is over, as if its holder had
    # stopped long ago.
    await db.execute(
        f"UPDATE {schema}.telegram_alerts SET claimed_at = claimed_at - interval '1 hour'"
        " WHERE call_id = 'c1'"
    )

    async def alerted() -> bool:
        state: str = await db.fetchval(f"SELECT state FROM {schema}.telegram_alerts")
        return state == "sent"

    await wait_for(alerted, what="the alert sent by the retry that took the claim over")
    assert [payload["text"].count("call c1") for payload in fake.sent()] == [1]


async def test_an_alert_telegram_refused_is_sent_once_the_database_takes_its_release(
    settings: Settings,
    amqp: AbstractRobustConnection,
    sinks: RunningSinks,
    bot: tuple[FakeBotApi, str],
    db: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Telegram surely refuses the alert (429), and the database refuses its release for
    longer than a few tries, long enough for another delivery to expire the claim as
    'unknown': the release waits for the database and still releases it, so the retry sends
    the alert (not released, it would read as "may have arrived" and never be sent)."""
    fake, url = bot
    fake.script = ["429"]
    schema = f'"{settings.namespace}"'
    await db.execute(
        f"CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'releases refused by the test'; END $$;"
        f" CREATE TRIGGER refuse_releases BEFORE UPDATE ON {schema}.telegram_alerts"
        f" FOR EACH ROW WHEN (NEW.state = 'failed') EXECUTE FUNCTION {schema}.refuse()"
    )
    try:
        await sinks.start(settings, [telegram(url, retry_delays_s=[0.5], max_attempts=100)])
        await publish_events(amqp, settings, [envelope("r1")])

        async def release_failed() -> bool:
            # Past the few quick tries: held (now), or given back to the broker (before).
            return "cannot release the alert for call r1" in caplog.text or (
                "database: RaiseError" in caplog.text
            )

        await wait_for(release_failed, seconds=30, what="the release refused past its tries")
        assert [payload["text"].count("call r1") for payload in fake.sent()] == [1]
        # Another delivery of the event found the claim past its lease (as EXPIRE_CLAIM does).
        await db.execute(
            f"UPDATE {schema}.telegram_alerts SET state = 'unknown' WHERE call_id = 'r1'"
        )
    finally:
        await db.execute(f"DROP TRIGGER IF EXISTS refuse_releases ON {schema}.telegram_alerts")

    async def alerted() -> bool:
        state: str = await db.fetchval(
            f"SELECT state FROM {schema}.telegram_alerts WHERE call_id = 'r1'"
        )
        return state == "sent"

    await wait_for(alerted, seconds=30, what="the alert sent once the release was stored")
    assert [payload["text"].count("call r1") for payload in fake.sent()] == [1, 1]
    assert [text.count("call r1") for text in fake.chat.values()] == [1]


async def test_a_claim_taken_over_is_no_longer_its_first_holders(
    settings: Settings, db: asyncpg.Pool
) -> None:
    """Two deliveries of one alert, the first one stalled past its claim's lease: the first
    may no longer send, release or abandon it, the one holding the claim now may; while it
    is claimed the caller's follow-ups wait; a lost answer to the start of the send still
    lets its holder release it."""
    pool = await create_pool(settings.database_url, settings.namespace, max_size=2)
    try:
        store = AlertStore(pool, lease=timedelta(minutes=1), claim_lease=timedelta(seconds=30))
        key, caller = AlertKey("missed", "acme", "t1"), "+79990009911"
        called_at = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)

        async def state() -> tuple[str, bool]:
            row = await pool.fetchrow("SELECT state, request_at FROM telegram_alerts")
            assert row is not None
            return row["state"], row["request_at"] is not None

        first = await store.claim(key, caller, called_at)
        assert isinstance(first, Held)
        assert await store.claim(key, caller, called_at) is Claim.BUSY
        assert await store.alert_being_sent(
            "missed", "acme", caller, called_at + timedelta(minutes=5), timedelta(hours=1)
        )
        await pool.execute("UPDATE telegram_alerts SET claimed_at = claimed_at - interval '1 h'")
        assert not await store.start_sending(first)  # lapsed, though no one took it over yet
        second = await store.claim(key, caller, called_at)
        assert isinstance(second, Held) and second.claim_id != first.claim_id

        await store.release(first)
        await store.abandon(first)
        assert await state() == ("sending", False)
        assert await store.start_sending(second)
        await store.release(first)
        assert await state() == ("sending", True)
        # The answer to the start of the send was lost: its holder sent nothing, and says so.
        await store.release(second)
        assert await state() == ("failed", False)
        third = await store.claim(key, caller, called_at)
        assert isinstance(third, Held)
        assert await store.start_sending(third)
        await store.abandon(third)
        assert await state() == ("unknown", True)
        assert await store.claim(key, caller, called_at) is Claim.SETTLED
    finally:
        await pool.close()


async def test_a_claim_of_a_sink_from_before_0006_is_not_taken_over(
    settings: Settings, db: asyncpg.Pool
) -> None:
    """During a rolling upgrade, a row claimed by an older sink (no claim id) may be mid-send:
    it is busy until its send lease is over, then "may have arrived", as it always was."""
    pool = await create_pool(settings.database_url, settings.namespace, max_size=2)
    try:
        store = AlertStore(pool, lease=timedelta(minutes=1), claim_lease=timedelta(seconds=30))
        key = AlertKey("missed", "acme", "o1")
        await pool.execute(
            "INSERT INTO telegram_alerts (sink, project, call_id, state, claimed_at)"
            " VALUES ('missed', 'acme', 'o1', 'sending', now() - interval '40 s')"
        )
        assert await store.claim(key, None, None) is Claim.BUSY
        await pool.execute("UPDATE telegram_alerts SET claimed_at = now() - interval '2 min'")
        assert await store.claim(key, None, None) is Claim.CUT_OFF
    finally:
        await pool.close()
