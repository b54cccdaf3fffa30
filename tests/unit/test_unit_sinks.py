"""Pure parts of the sinks: retry schedule, sinks file, response classification, texts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from standardwebhooks.webhooks import Webhook

from schemas.topology import validate_binding_key
from sinks.config import SinksFileError
from sinks.port import Done, GiveUp, RetryLater
from sinks.registry import load_sinks
from sinks.retry import Ack, DeadLetter, Delay, RetrySchedule, next_action
from sinks.telegram import TelegramSinkConfig, read_answer
from sinks.telegram_text import followed_up_text, missed_call_text
from sinks.webhook import (
    WebhookSinkConfig,
    classify_response,
    retry_after_seconds,
    signed_headers,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SCHEDULE = RetrySchedule(delays_s=(5.0, 30.0, 120.0), max_attempts=5)


@pytest.mark.parametrize(
    ("attempt", "hint", "expected"),
    [
        (1, None, 5.0),
        (2, None, 30.0),
        (3, None, 120.0),
        (9, None, 120.0),  # past the schedule's end: its last step
        (1, 3.0, 5.0),  # a hint shorter than the step changes nothing
        (1, 20.0, 30.0),  # the shortest step that honours the hint
        (1, 500.0, 120.0),  # longer than any step: the longest
        (0, None, 5.0),
    ],
)
def test_delay_for(attempt: int, hint: float | None, expected: float) -> None:
    assert SCHEDULE.delay_for(attempt, hint) == expected


def test_next_action() -> None:
    assert next_action(Done(), 1, SCHEDULE) == Ack()
    assert next_action(GiveUp("410"), 1, SCHEDULE) == DeadLetter("410")
    assert next_action(RetryLater("503"), 1, SCHEDULE) == Delay(5.0, 2, "503")
    assert next_action(RetryLater("429", 25), 2, SCHEDULE) == Delay(30.0, 3, "429")
    assert next_action(RetryLater("503"), 5, SCHEDULE) == DeadLetter(
        "gave up after 5 attempts: 503"
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, Done),
        (204, Done),
        (408, RetryLater),
        (425, RetryLater),
        (429, RetryLater),
        (500, RetryLater),
        (503, RetryLater),
        (301, GiveUp),
        (400, GiveUp),
        (404, GiveUp),
        (410, GiveUp),
        (413, GiveUp),
    ],
)
def test_classify_response(status: int, kind: type) -> None:
    assert isinstance(classify_response(status, None), kind)


def test_retry_after_hint_is_kept() -> None:
    assert classify_response(429, 12.0) == RetryLater("HTTP 429", 12.0)


def test_retry_after_seconds() -> None:
    now = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds("Wed, 25 Nov 2026 07:01:00 GMT", now) == 60.0
    assert retry_after_seconds("Wed, 25 Nov 2026 06:00:00 GMT", now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None
    # Odd values are no hint, not an error (an error would retry even a 2xx).
    assert retry_after_seconds("Feb 99999999999999999999 00:00:00 nan 29", now) is None
    assert retry_after_seconds("nan", now) is None
    assert retry_after_seconds("inf", now) is None


def test_signature_follows_the_standard_webhooks_spec() -> None:
    now = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    body = '{"event_id":"acme:1:end","call":{"city":"Москва"}}'.encode()
    headers = signed_headers(Webhook(SECRET), "acme:1:end", body, now)
    assert headers["webhook-id"] == "acme:1:end"
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    # The spec by hand: HMAC-SHA256 over "id.timestamp.body" with the base64-decoded secret.
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = b"acme:1:end." + headers["webhook-timestamp"].encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sinks.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_sinks_file_with_both_kinds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[[webhook]]
name = "crm"
url = "https://crm.example/hooks"
secret = "{SECRET}"
events = ["call.ended.*"]
projects = ["shop"]

[[telegram]]
name = "missed"
bot_token = "123:ABC"
chat_id = -1001234567890
""",
    )
    crm, missed = load_sinks(path)
    assert isinstance(crm, WebhookSinkConfig) and isinstance(missed, TelegramSinkConfig)
    assert crm.binding_keys == ("call.ended.*",)
    assert crm.wants("shop", "call.ended.missed") and not crm.wants("clinic", "call.ended.missed")
    assert not crm.wants("shop", "call.started")
    assert missed.chat_id == "-1001234567890"
    assert missed.binding_keys == ("call.ended.missed", "call.ended.answered")
    assert missed.wants("anything", "call.ended.missed")
    assert not missed.wants("anything", "call.started")  # not bound: a replay's straight send
    assert "ABC" not in repr(missed) and "0123" not in repr(crm)


def test_no_file_no_sinks() -> None:
    assert load_sinks(None) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[slack]]\nname='x'", "unknown sink kind 'slack'"),
        ("[webhook]\nname='x'", "write [[webhook]]"),
        ("[[webhook]]\nname='Bad Name'\nurl='http://x'\nsecret='{s}'", "[[webhook]] #1: name"),
        ("[[webhook]]\nname='crm'\nurl='ftp://x'\nsecret='{s}'", "url:"),
        ("[[webhook]]\nname='crm'\nurl='http://x'\nsecret='nope!'", "Standard Webhooks secret"),
        ("[[webhook]]\nname='crm'\nurl='http://x'", "secret: Field required"),
        (
            "[[webhook]]\nname='crm'\nurl='http://x'\nsecret='{s}'\nevents=['call.*x']",
            "whole words",
        ),
        ("[[webhook]]\nname='crm'\nurl='http://x'\nsecret='{s}'\nretry_delays_s=[]", "delay"),
        (
            "[[webhook]]\nname='crm'\nurl='http://x'\nsecret='{s}'\n"
            "retry_delays_s=[86399.999, 86400]",
            "delays 86399.999 and 86400.0 would share one delay queue (.retry.86400s)",
        ),
        ("[[webhook]]\nname='crm'\nurl='http://x'\nsecret='{s}'\ntypo=1", "typo: Extra inputs"),
        (
            "[[telegram]]\nname='crm'\nbot_token='1:A'\nchat_id=1\n[[webhook]]\nname='crm'\n"
            "url='http://x'\nsecret='{s}'",
            "'crm' is used twice",
        ),
        ("not toml = = =", "not valid TOML"),
        ("[[webhook]]\nname='crm'\nurl='http://x'\nsecret='{s}'\nprojects=[]", "projects"),
        ("[[telegram]]\nname='t'\nbot_token='1:A/../x'\nchat_id=1", "bot_token: Value error"),
        ("[[telegram]]\nname='t'\nbot_token=''\nchat_id=1", "BotFather"),
        ("[[telegram]]\nname='t'\nbot_token='1:A'\nchat_id=''", "chat_id"),
    ],
)
def test_sinks_file_errors_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text.replace("{s}", SECRET))
    with pytest.raises(SinksFileError) as caught:
        load_sinks(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert "nope!" not in str(caught.value) and "A/../x" not in str(caught.value)


def test_missing_sinks_file(tmp_path: Path) -> None:
    with pytest.raises(SinksFileError, match="cannot read it"):
        load_sinks(tmp_path / "absent.toml")


@pytest.mark.parametrize("key", ["#", "call.#", "call.ended.*", "call.started", "*.*.missed"])
def test_good_binding_keys(key: str) -> None:
    assert validate_binding_key(key) == key


@pytest.mark.parametrize("key", ["", "call..x", "call.#x", "call.ended*", ".call"])
def test_bad_binding_keys(key: str) -> None:
    with pytest.raises(ValueError):
        validate_binding_key(key)


@pytest.mark.parametrize(
    ("status", "body", "ok", "sent", "retry_after", "may_retry"),
    [
        (200, b'{"ok":true,"result":{"message_id":5}}', True, True, None, False),
        (
            429,
            b'{"ok":false,"description":"Too Many","parameters":{"retry_after":7}}',
            False,
            False,
            7.0,
            True,
        ),
        (
            400,
            b'{"ok":false,"description":"Bad Request: chat not found"}',
            False,
            False,
            None,
            False,
        ),
        (502, b"<html>Bad Gateway</html>", False, None, None, True),
        (502, b'{"error":"upstream timed out"}', False, None, None, True),  # a proxy's JSON
        (200, b'{"result":{"message_id":5}}', False, None, None, False),
        (200, b"<html>captive portal</html>", False, None, None, False),
    ],
)
def test_read_bot_api_answer(
    status: int,
    body: bytes,
    ok: bool,
    sent: bool | None,
    retry_after: float | None,
    may_retry: bool,
) -> None:
    answer = read_answer(status, body)
    assert (answer.ok, answer.sent, answer.retry_after_s, answer.may_retry) == (
        ok,
        sent,
        retry_after,
        may_retry,
    )


CALL: dict[str, Any] = {
    "call_id": "100500",
    "caller": "+79990009911",
    "callee": "+74951234567",
    "called_at": "2026-11-25T07:03:00Z",
    "status": "NOANSWER",
    "utm_source": "yandex",
    "utm_campaign": "brand",
    "landing_page": "https://shop.example/" + "x" * 400,
}


def test_missed_call_text() -> None:
    text = missed_call_text("shop", CALL, ZoneInfo("Europe/Moscow"))
    assert text.splitlines()[:4] == [
        "📵 Missed call",
        "From: +79990009911",
        "To: +74951234567",
        "When: 25.11.2026 10:03 (Europe/Moscow)",
    ]
    assert "Source: yandex / brand" in text
    assert "Project: shop · call 100500" in text
    assert len(text) < 1000  # a long landing page is cut


def test_missed_call_text_with_little_known() -> None:
    text = missed_call_text("shop", {"call_id": "1"}, ZoneInfo("UTC"))
    assert "From: unknown number" in text and "When: unknown" in text
    assert "Source" not in text


def test_followed_up_text() -> None:
    answered = {"call_id": "2", "called_at": "2026-11-25T07:20:00Z", "duration_s": 95}
    text = followed_up_text("alert", answered, ZoneInfo("Europe/Moscow"))
    assert (
        text
        == "alert\n\n✅ Reached: the caller got through at 25.11.2026 10:20, talked 1:35 (call 2)"
    )


def test_the_example_sinks_file_is_valid_once_uncommented(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "examples" / "sinks.toml"
    assert load_sinks(example) == []  # as shipped: every sink commented out
    lines = example.read_text(encoding="utf-8").splitlines()
    # Uncomment the tables and their keys, not the prose.
    active = [line.removeprefix("# ") for line in lines if re.match(r"# (\[\[|\w+ = )", line)]
    crm, missed = load_sinks(write(tmp_path, "\n".join(active)))
    assert crm.name == "crm" and missed.name == "missed"


def test_the_default_schedule_outlasts_an_hour_long_outage() -> None:
    schedule = RetrySchedule()
    waited = sum(schedule.delay_for(attempt) for attempt in range(1, schedule.max_attempts))
    assert waited > 3 * 3600  # the bar is one hour; the defaults give about ten
