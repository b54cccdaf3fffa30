"""The port every sink implements: deliver one event, say done, retry later or give up. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Done:
    """Delivered, or nothing to deliver (filtered out, already sent)."""


@dataclass(frozen=True)
class RetryLater:
    """The destination is briefly unavailable; `after_s` is its own hint (Retry-After)."""

    reason: str
    after_s: float | None = None


@dataclass(frozen=True)
class GiveUp:
    """This event can never be delivered as it is: it goes to `{ns}.dead` with the reason."""

    reason: str


DeliveryResult = Done | RetryLater | GiveUp


@dataclass(frozen=True)
class Event:
    """One event as a sink receives it: the exact bytes published, and their decoded form."""

    body: bytes
    envelope: dict[str, Any]
    routing_key: str

    @property
    def event_id(self) -> str:
        return str(self.envelope.get("event_id", ""))

    @property
    def project(self) -> str:
        return str(self.envelope.get("project", ""))

    @property
    def call(self) -> dict[str, Any]:
        call = self.envelope.get("call")
        return call if isinstance(call, dict) else {}


class Sink(Protocol):
    """An adapter for one destination. `deliver` must not raise for the destination's
    failures: it classifies them. An exception is taken as a bug and retried a few times."""

    async def deliver(self, event: Event) -> DeliveryResult: ...

    async def close(self) -> None: ...
