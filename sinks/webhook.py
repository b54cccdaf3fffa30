"""Outgoing webhooks, signed per the Standard Webhooks spec. One POST per event."""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
from pydantic import AnyHttpUrl, SecretStr, field_validator
from standardwebhooks.webhooks import Webhook

from schemas.topology import validate_binding_key
from sinks.config import SinkConfig
from sinks.port import DeliveryResult, Done, Event, GiveUp, RetryLater

log = logging.getLogger(__name__)

# Spec: these mean "try again later"; any other 4xx will not change by retrying.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "callpipe-webhooks/1"
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16
MAX_ANSWER_BYTES = 64 * 1024


class WebhookSinkConfig(SinkConfig):
    """`[[webhook]]`: POST every matching event to `url`, signed with `secret`."""

    url: AnyHttpUrl
    secret: SecretStr
    events: tuple[str, ...] = ("#",)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        encoded = value.get_secret_value().removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:
            key = b""
        if not value.get_secret_value().startswith(SECRET_PREFIX) or len(key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"must be a Standard Webhooks secret: {SECRET_PREFIX} and at least "
                f"{MIN_SECRET_BYTES} random bytes in base64"
            )
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError('needs at least one binding key ("#" for every event)')
        return tuple(validate_binding_key(key) for key in value)

    @property
    def binding_keys(self) -> tuple[str, ...]:
        return self.events


def signed_headers(secret: Webhook, event_id: str, body: bytes, now: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for `body` sent at `now`."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": secret.sign(event_id, now, body.decode("utf-8")),
    }


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - now).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def classify_response(status: int, retry_after: float | None) -> DeliveryResult:
    """2xx done; 408, 425, 429 and 5xx later; anything else (410 Gone included) never."""
    if 200 <= status < 300:
        return Done()
    if status in RETRYABLE_STATUSES or status >= 500:
        return RetryLater(f"HTTP {status}", retry_after)
    return GiveUp(f"HTTP {status}: the destination refused the event")


def network_failure(exc: aiohttp.ClientError) -> str:
    """Why a request failed, without its URL: a destination's path or query often holds its
    secret (a Bitrix24 or Zapier hook), and this reason goes to the log and to `{ns}.dead`."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ClientResponseError):  # a malformed answer
        return f"{type(exc).__name__}: {exc.status} {exc.message}"[:200]
    return type(exc).__name__


class WebhookSink:
    def __init__(self, config: WebhookSinkConfig, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._url = str(config.url)
        self._secret = Webhook(config.secret.get_secret_value())
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    @classmethod
    def open(cls, config: WebhookSinkConfig) -> WebhookSink:
        # Our own connection limit: the consumer's prefetch already caps requests in flight.
        connector = aiohttp.TCPConnector(limit=config.max_in_flight)
        return cls(config, aiohttp.ClientSession(connector=connector))

    async def deliver(self, event: Event) -> DeliveryResult:
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signed_headers(self._secret, event.event_id, event.body, now),
        }
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url,
                data=event.body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                hint = retry_after_seconds(response.headers.get("Retry-After"), now)
                # The status has answered: a body that stalls or breaks off changes nothing
                # (a 200 is delivered, a 400 refused). Drained, up to a limit, so that the
                # connection can be reused.
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    await response.content.read(MAX_ANSWER_BYTES)
        except TimeoutError:
            return RetryLater(f"no answer within {self._config.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return RetryLater(network_failure(exc))
        except ValueError as exc:  # aiohttp refused to make the request (a header value)
            return GiveUp(f"the event cannot be sent as a request: {type(exc).__name__}")
        result = classify_response(status, hint)
        log.debug(
            "webhook %s: event %s -> HTTP %d in %.0f ms",
            self._config.name,
            event.event_id,
            status,
            (time.monotonic() - started) * 1000,
        )
        return result

    async def close(self) -> None:
        await self._session.close()
