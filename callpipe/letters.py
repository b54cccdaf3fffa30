"""A message kept for humans (`{ns}.dead`, `{ns}.rejected`) as the commands see it: pure.

A message in a queue has no id of its own in AMQP, and `message_id` is not unique (a call's
webhook and its sink's event share it). A letter's id is therefore a hash of what it is: its
message id, routing key, body and headers (less those the broker changes on every read). It
stays the same however often the queue is read or a message is copied to reset its delivery
count; exact copies share an id, and a command given that id acts on each copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from schemas import codec
from schemas.topology import HEADER_RECEIVED_AT, HEADER_ROUTING_KEY

ID_LENGTH = 12
# When callpipe last sent this message back (kept across a new death by workers and sinks).
HEADER_REQUEUED_AT = "x-callpipe-requeued-at"
# Set by the broker on each delivery: never part of what the message is.
VOLATILE_HEADERS = frozenset({"x-delivery-count", "x-acquired-count", HEADER_ROUTING_KEY})


@dataclass(frozen=True)
class Letter:
    body: bytes
    routing_key: str
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    delivery_tag: int = 0

    @property
    def id(self) -> str:
        return letter_id(self)

    def text(self, name: str) -> str | None:
        """A header as text (AMQP long strings may arrive as bytes); None when absent."""
        value = self.headers.get(name)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return None if value is None else str(value)

    @property
    def effective_routing_key(self) -> str:
        """The routing key it was published with, also after a copy through the default
        exchange, which keeps it in `x-callpipe-routing-key` (as the sinks do)."""
        return self.text(HEADER_ROUTING_KEY) or self.routing_key

    @property
    def delivery_count(self) -> int:
        """How often the queue has handed it out before (RabbitMQ's `x-delivery-count`)."""
        value = self.headers.get("x-delivery-count")
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def deaths(self) -> list[Mapping[str, Any]]:
        """The broker's `x-death` entries, newest first."""
        entries = self.headers.get("x-death")
        if not isinstance(entries, list):
            return []
        return [entry for entry in entries if isinstance(entry, Mapping)]

    def document(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return codec.loads(self.body)
        except ValueError:
            return None


def canonical_value(value: Any) -> Any:
    """Header values in one form, whatever AMQP type they travelled as."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): canonical_value(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [canonical_value(item) for item in value]
    return value


def letter_id(letter: Letter) -> str:
    """12 hex digits of SHA-256 over what the message is (see the module's docstring)."""
    headers = {k: v for k, v in letter.headers.items() if k not in VOLATILE_HEADERS}
    identity = [letter.message_id, letter.effective_routing_key, canonical_value(headers)]
    digest = hashlib.sha256(codec.dumps(identity) + b"\0" + letter.body)
    return digest.hexdigest()[:ID_LENGTH]


def without(headers: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    return {key: value for key, value in headers.items() if key not in names}


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    except ValueError:
        return None


def last_known_time(letter: Letter) -> datetime | None:
    """The latest moment the message is known to have been alive and well, which is no later
    than its death: its death by the broker (`x-death`), its last requeue by callpipe, its
    receipt by the ingress, or (a sink's event) the event's `received_at`."""
    moments = [_parse_time(entry.get("time")) for entry in letter.deaths]
    moments += [
        _parse_time(letter.headers.get(name)) for name in (HEADER_REQUEUED_AT, HEADER_RECEIVED_AT)
    ]
    document = letter.document()
    if isinstance(document, dict) and "event_id" in document:
        moments.append(_parse_time(document.get("received_at")))
    known = [moment for moment in moments if moment is not None]
    return max(known) if known else None


def age_seconds(letter: Letter, now: datetime) -> float | None:
    moment = last_known_time(letter)
    return None if moment is None else max((now - moment).total_seconds(), 0.0)


def format_age(seconds: float | None) -> str:
    """`45s`, `12m`, `3h05m`, `2d04h`; `?` when unknown."""
    if seconds is None:
        return "?"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `45s` or a sum such as `1d12h`, in seconds; ValueError otherwise."""
    spec = text.strip().lower()
    total, number = 0, ""
    for char in spec:
        if char.isdigit():
            number += char
        elif char in _UNITS and number:
            total += int(number) * _UNITS[char]
            number = ""
        else:
            break
    else:
        if spec and not number:
            return float(total)
    raise ValueError(f"{text!r} is not a duration such as 7d, 12h, 30m or 1d12h")


def now_utc() -> datetime:
    return datetime.now(UTC)
