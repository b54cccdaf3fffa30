"""Missed-call alerts to a Telegram chat: one message per missed call, edited on callback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import aiohttp
from pydantic import AnyHttpUrl, Field, SecretStr, field_validator

from infra.masking import mask_phone
from schemas import codec
from sinks.alerts import (
    DATABASE_AWAY,
    DATABASE_ERRORS,
    AlertKey,
    AlertStore,
    Claim,
    Held,
    tried_hard,
)
from sinks.config import SinkConfig
from sinks.port import DeliveryResult, Done, Event, GiveUp, RetryLater
from sinks.telegram_text import followed_up_text, missed_call_text

log = logging.getLogger(__name__)

# Between tries of a release the alert's fate hangs on, once `tried_hard` failed. While the
# database is away they go on until it answers; while it refuses the release (a trigger, a
# permission), for this long at most, so that one alert does not hold up the sink for good.
RELEASE_PAUSE_S = 1.0
RELEASE_PAUSE_MAX_S = 30.0
RELEASE_REFUSED_FOR_AT_MOST_S = 300.0
RELEASE_WARN_EVERY_S = 60.0

BOT_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]+")
CHAT_ID = re.compile(r"-?\d+|@[A-Za-z][A-Za-z0-9_]{3,}")
MAX_ANSWER_BYTES = 1024 * 1024

T = TypeVar("T")


class TelegramSinkConfig(SinkConfig):
    """`[[telegram]]`: alerts on missed calls to `chat_id`, followed up when a callback ends."""

    bot_token: SecretStr
    chat_id: str
    api_base: AnyHttpUrl = AnyHttpUrl("https://api.telegram.org")
    callback_window_min: int = Field(default=120, ge=0, le=7 * 24 * 60)
    max_in_flight: int = Field(default=1, ge=1, le=256)  # a chat takes about one message a second

    @field_validator("chat_id", mode="before")
    @classmethod
    def _chat_id(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("chat_id")
    @classmethod
    def _chat_id_form(cls, value: str) -> str:
        if not CHAT_ID.fullmatch(value):
            raise ValueError("must be a chat's number (-100...) or a channel's @username")
        return value

    @field_validator("bot_token")
    @classmethod
    def _token_form(cls, value: SecretStr) -> SecretStr:
        # It becomes part of the URL's path: nothing else may slip in there.
        if not BOT_TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("must look like 123456:ABC-def (from @BotFather)")
        return value

    @property
    def binding_keys(self) -> tuple[str, ...]:
        return ("call.ended.missed", "call.ended.answered")

    @property
    def lease(self) -> timedelta:
        """How long a send may take before a claim counts as cut off mid-send."""
        return timedelta(seconds=2 * self.timeout_s + 30)


@dataclass(frozen=True)
class ApiAnswer:
    """How one Bot API call ended, from the point of view of "did the chat get it"."""

    ok: bool
    sent: bool | None  # False: surely not delivered; None: cannot tell (timeout mid-request)
    result: Any = None
    error: str = ""
    retry_after_s: float | None = None

    @property
    def may_retry(self) -> bool:
        return self.retry_after_s is not None or self.error.startswith(("HTTP 5", "network"))


def read_answer(status: int, body: bytes) -> ApiAnswer:
    """Classify a Bot API response. Pure."""
    try:
        document = codec.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or "ok" not in document:
        # Not the Bot API speaking (every answer of it has "ok"): a gateway's 2xx or 5xx may
        # come after the message was posted; only a 4xx from in front of the API surely
        # stopped it.
        sent = False if 400 <= status < 500 else None
        return ApiAnswer(False, sent, error=f"HTTP {status} without a Bot API answer")
    if document.get("ok") is True:
        return ApiAnswer(True, True, result=document.get("result"))
    description = str(document.get("description", ""))[:200]
    parameters = document.get("parameters")
    retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
    if status == 429 or isinstance(retry_after, int | float):
        return ApiAnswer(
            False,
            False,
            error=f"HTTP {status}: {description}",
            retry_after_s=float(retry_after or 1),
        )
    return ApiAnswer(False, False, error=f"HTTP {status}: {description}")


class BotApi:
    """The two Bot API methods an alert needs. The token stays out of every message."""

    def __init__(self, config: TelegramSinkConfig, session: aiohttp.ClientSession) -> None:
        base = str(config.api_base).rstrip("/")
        self._base = f"{base}/bot{config.bot_token.get_secret_value()}"
        self._session = session
        # Connecting gets half the time: a connection that cannot be made in it fails as
        # "never connected", which may be retried, not as a request cut off mid-way.
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s, connect=config.timeout_s / 2)

    async def call(self, method: str, payload: dict[str, Any]) -> ApiAnswer:
        try:
            async with self._session.post(
                f"{self._base}/{method}",
                data=codec.dumps(payload),
                headers={"content-type": "application/json"},
                timeout=self._timeout,
            ) as response:
                body = await response.content.read(MAX_ANSWER_BYTES)
                return read_answer(response.status, body)
        except aiohttp.ClientConnectorError as exc:
            # Never connected: the request did not leave this machine.
            return ApiAnswer(False, False, error=f"network: cannot connect ({exc.os_error})")
        except aiohttp.ConnectionTimeoutError:
            # No connection within the connect timeout (packets dropped): nothing was sent.
            return ApiAnswer(False, False, error="network: cannot connect (timed out)")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return ApiAnswer(False, None, error=f"no complete answer: {type(exc).__name__}")

    async def close(self) -> None:
        await self._session.close()


class TelegramSink:
    def __init__(
        self, config: TelegramSinkConfig, api: BotApi, store: AlertStore, tz: ZoneInfo
    ) -> None:
        self._config = config
        self._api = api
        self._store = store
        self._tz = tz
        self._window = timedelta(minutes=config.callback_window_min)

    async def deliver(self, event: Event) -> DeliveryResult:
        call = event.call
        if event.envelope.get("type") != "call.ended":
            return Done()
        try:
            if call.get("outcome") == "missed":
                return await self._alert(event.project, call)
            if call.get("outcome") == "answered":
                return await self._follow_up(event.project, call)
        except DATABASE_ERRORS as exc:
            return RetryLater(f"database: {type(exc).__name__}")
        return Done()

    async def _alert(self, project: str, call: dict[str, Any]) -> DeliveryResult:
        key = AlertKey(self._config.name, project, str(call.get("call_id")))
        claim = await self._store.claim(key, call.get("caller"), _time(call.get("called_at")))
        if claim is Claim.SETTLED:
            return Done()
        if claim is Claim.BUSY:
            return RetryLater("another delivery of this alert is in progress")
        if claim is Claim.CUT_OFF:
            return GiveUp("an earlier attempt stopped mid-send: the alert may have arrived")
        text = missed_call_text(project, call, self._tz)
        caller, missed_at = call.get("caller"), _time(call.get("called_at"))
        callback = None
        if caller and missed_at is not None:
            callback = await self._before_sending(
                claim, self._store.answered_callback(project, caller, missed_at, self._window)
            )
        if callback is not None:
            text = followed_up_text(text, callback, self._tz)
        if not await self._before_sending(claim, self._store.start_sending(claim)):
            return RetryLater("the claim on this alert lapsed before its request went out")
        answer = await self._api.call(
            "sendMessage",
            {"chat_id": self._config.chat_id, "text": text, "disable_web_page_preview": True},
        )
        if answer.ok:
            message_id = int(answer.result["message_id"])
            followed_up_by = callback["call_id"] if callback else None
            await self._note_sent(key, message_id, text, followed_up_by)
            log.info(
                "telegram %s: alert for missed call %s from %s",
                self._config.name,
                key.call_id,
                mask_phone(caller),
            )
            return Done()
        if answer.sent is None:
            await self._store.abandon(claim)
            return GiveUp(f"{answer.error}: the alert may have arrived, so it is not sent again")
        await self._release_after_refusal(claim)
        if answer.may_retry:
            return RetryLater(answer.error, answer.retry_after_s)
        return GiveUp(answer.error)

    async def _before_sending(self, claim: Held, step: Awaitable[T]) -> T:
        """A database step between the claim and the send: when it fails, nothing was sent,
        so the claim is released for the retry (or, if the database is away for longer, taken
        over once its lease is over)."""
        try:
            return await step
        except DATABASE_ERRORS:
            with contextlib.suppress(*DATABASE_ERRORS):
                await self._release(claim)
            raise

    async def _release(self, held: Held) -> None:
        """The alert was surely not sent: release its claim, trying hard, so that the retry
        can send it at once."""
        await tried_hard(lambda: self._store.release(held))

    async def _release_after_refusal(self, held: Held) -> None:
        """Telegram surely did not get it, but its request went out: until the release is
        stored, the claim reads as "may have arrived" and the alert would never be sent. So
        the release is tried until it is stored, this delivery waiting meanwhile (a sink
        stopped meanwhile leaves the claim as it is)."""
        name, call_id = self._config.name, held.key.call_id
        started = time.monotonic()
        warned_at: float | None = None
        pause_s = RELEASE_PAUSE_S
        while True:
            try:
                released = await tried_hard(lambda: self._store.release(held))
                break
            except DATABASE_ERRORS as exc:
                held_s = time.monotonic() - started
                if not isinstance(exc, DATABASE_AWAY) and held_s >= RELEASE_REFUSED_FOR_AT_MOST_S:
                    log.error(
                        "telegram %s: the database refused to release the alert for call %s "
                        "for %.0fs (%r): it stays claimed, reads as may have arrived, and is "
                        "not sent", name, call_id, held_s, exc,
                    )  # fmt: skip
                    raise
                if warned_at is None or time.monotonic() - warned_at >= RELEASE_WARN_EVERY_S:
                    warned_at = time.monotonic()
                    log.warning(
                        "telegram %s: cannot release the alert for call %s, which Telegram "
                        "refused, for %.0fs (%r); holding it until the database takes it",
                        name, call_id, held_s, exc,
                    )  # fmt: skip
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, RELEASE_PAUSE_MAX_S)
        if warned_at is not None:
            log.info("telegram %s: released the alert for call %s", name, call_id)
        if not released:  # taken over or settled meanwhile: the retry finds out which
            log.warning("telegram %s: the claim on call %s was no longer held", name, call_id)

    async def _note_sent(
        self, key: AlertKey, message_id: int, text: str, followed_up_by: str | None
    ) -> None:
        """The alert is in the chat: note it, trying hard, since a retry would not resend it."""
        chat_id = self._config.chat_id
        try:
            await tried_hard(
                lambda: self._store.mark_sent(key, chat_id, message_id, text, followed_up_by)
            )
        except DATABASE_ERRORS as exc:
            # Sent once, and never again; its follow-up is lost, and this caller's other
            # follow-ups wait until its claim's lease is over.
            log.error(
                "telegram %s: alert for call %s sent (message %d) but not noted: %r",
                self._config.name,
                key.call_id,
                message_id,
                exc,
            )

    async def _follow_up(self, project: str, call: dict[str, Any]) -> DeliveryResult:
        caller, answered_at = call.get("caller"), _time(call.get("called_at"))
        if not caller or answered_at is None:
            return Done()
        if await self._store.alert_being_sent(
            self._config.name, project, caller, answered_at, self._window
        ):
            return RetryLater("an alert for this caller is being sent: follow it up after")
        alerts = await self._store.claim_follow_ups(
            self._config.name,
            project,
            caller,
            str(call.get("call_id")),
            answered_at,
            self._window,
        )
        refused: list[str] = []
        for alert in alerts:
            answer = await self._api.call(
                "editMessageText",
                {
                    "chat_id": alert.chat_id,
                    "message_id": alert.message_id,
                    "text": followed_up_text(alert.text, call, self._tz),
                    "disable_web_page_preview": True,
                },
            )
            if answer.ok or "message is not modified" in answer.error:
                continue  # an edit is idempotent: a redelivery may do it again
            if answer.may_retry or answer.sent is None:
                return RetryLater(answer.error, answer.retry_after_s)
            refused.append(f"call {alert.call_id}: {answer.error}")
        if refused:
            return GiveUp("follow-up refused: " + "; ".join(refused))
        if alerts:
            log.info(
                "telegram %s: %d alert(s) for %s followed up",
                self._config.name,
                len(alerts),
                mask_phone(caller),
            )
        return Done()

    async def close(self) -> None:
        await self._api.close()


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
