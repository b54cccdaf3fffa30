"""Names of every exchange, queue, routing key and header, derived from the namespace."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["start", "end"]
KINDS: tuple[Kind, ...] = ("start", "end")

ROUTING_KEY_BY_KIND: dict[Kind, str] = {
    "start": "roistat.call.start",
    "end": "roistat.call.end",
}
ROUTING_KEY_REJECTED = "roistat.rejected"

HEADER_PROJECT = "x-callpipe-project"
HEADER_KIND = "x-callpipe-kind"
HEADER_RECEIVED_AT = "x-callpipe-received-at"
HEADER_REMOTE_ADDR = "x-callpipe-remote-addr"
HEADER_REJECT_REASON = "x-callpipe-reject-reason"
HEADER_ERROR = "x-callpipe-error"
# Set by a sink on what it delays (the attempt it is at) or dead-letters (its own name).
HEADER_ATTEMPT = "x-callpipe-attempt"
HEADER_SINK = "x-callpipe-sink"

# RabbitMQ 3.x quorum queues have no delivery limit unless one is set; 4.x defaults to 20.
DELIVERY_LIMIT = 20

_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# A sink's or a subscription's name is the last part of its queue's name.
_ENDPOINT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class InvalidNamespaceError(ValueError):
    """The namespace cannot name both RabbitMQ objects and a PostgreSQL schema."""


def validate_namespace(namespace: str) -> str:
    """Return the namespace if it is usable as a queue prefix and a schema name."""
    if not _NAMESPACE.fullmatch(namespace):  # `$` alone would let a trailing newline in
        raise InvalidNamespaceError(
            f"namespace {namespace!r} must be 1-48 characters of a-z, 0-9 and _, "
            "starting with a letter"
        )
    return namespace


def validate_endpoint_name(name: str) -> str:
    """Return a sink or subscription name if it can name a queue: `[a-z][a-z0-9_-]{0,31}`."""
    if not _ENDPOINT_NAME.fullmatch(name):
        raise ValueError(
            f"name {name!r} must be 1-32 characters of a-z, 0-9, _ and -, starting with a letter"
        )
    return name


@dataclass(frozen=True)
class Topology:
    """The RabbitMQ objects of one namespace (`CALLPIPE_NAMESPACE`)."""

    namespace: str

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    @property
    def webhooks_exchange(self) -> str:
        return f"{self.namespace}.webhooks"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def rejected_queue(self) -> str:
        return f"{self.namespace}.rejected"

    def call_queue(self, kind: Kind) -> str:
        return f"{self.namespace}.call-{kind}"

    def sink_queue(self, name: str) -> str:
        """The queue a configured sink consumes: `{ns}.sink.{name}`."""
        return f"{self.namespace}.sink.{validate_endpoint_name(name)}"

    def subscription_queue(self, name: str) -> str:
        """A downstream system's own queue (`callpipe subscribe`): `{ns}.sub.{name}`."""
        return f"{self.namespace}.sub.{validate_endpoint_name(name)}"

    @property
    def work_queues(self) -> dict[str, str]:
        """Each queue the ingress feeds, with the binding key that feeds it."""
        return {
            self.call_queue("start"): "*.call.start",
            self.call_queue("end"): "*.call.end",
            self.rejected_queue: "*.rejected",
        }


def event_routing_key(event_type: str, outcome: str | None) -> str:
    """`call.started`, `call.stale`, or `call.ended.<outcome>` for a call end."""
    if event_type in ("call.started", "call.stale"):
        return event_type
    return f"call.ended.{outcome or 'unknown'}"


def routing_key_of(event: Mapping[str, Any]) -> str:
    """The routing key of a stored envelope: `call.started` or `call.ended.<outcome>`."""
    call = event.get("call")
    outcome = call.get("outcome") if isinstance(call, dict) else None
    return event_routing_key(str(event.get("type")), outcome)


def event_id(project: str, call_id: str, kind: Kind) -> str:
    """The idempotency key of one webhook: `{project}:{call_id}:{kind}`."""
    return f"{project}:{call_id}:{kind}"


def stale_event_id(project: str, call_id: str) -> str:
    """The idempotency key of a call's one `call.stale` event: `{project}:{call_id}:stale`."""
    return f"{project}:{call_id}:stale"


# A replay publishes straight to a queue (default exchange), so the routing key a subscriber
# of `{ns}.events` would see travels in this header instead.
HEADER_ROUTING_KEY = "x-callpipe-routing-key"

_BINDING_KEY_MAX_BYTES = 255  # AMQP shortstr


class InvalidBindingKeyError(ValueError):
    """Not a topic binding key: dot-separated words, `*` and `#` only as whole words."""


def validate_binding_key(key: str) -> str:
    """Return `key` if it is a topic binding key such as `call.ended.*` or `call.#`."""
    if not key:
        raise InvalidBindingKeyError("a binding key cannot be empty (use '#' for everything)")
    if len(key.encode()) > _BINDING_KEY_MAX_BYTES:
        raise InvalidBindingKeyError(f"binding key is over {_BINDING_KEY_MAX_BYTES} bytes")
    for word in key.split("."):
        if not word:
            raise InvalidBindingKeyError(
                f"binding key {key!r} has an empty word: words are separated by single dots"
            )
        if word not in ("*", "#") and ("*" in word or "#" in word):
            raise InvalidBindingKeyError(
                f"binding key {key!r}: '*' and '#' must be whole words, as in 'call.ended.*'"
            )
        if any(char.isspace() or not char.isprintable() for char in word):
            raise InvalidBindingKeyError(
                f"binding key {key!r} contains whitespace or a control character"
            )
    return key


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """Whether a topic exchange routes `routing_key` to a `binding_key` binding.

    Words are separated by dots; `*` matches exactly one word, `#` zero or more.
    """
    pattern = binding_key.split(".") if binding_key else []
    words = routing_key.split(".") if routing_key else []
    # The pattern positions reachable after the words read so far (an NFA, no backtracking).
    states = _after_hashes(pattern, {0})
    for word in words:
        following: set[int] = set()
        for position in states:
            if position == len(pattern):
                continue
            token = pattern[position]
            if token == "#":
                following.add(position)
            elif token in ("*", word):
                following.add(position + 1)
        states = _after_hashes(pattern, following)
        if not states:
            return False
    return len(pattern) in states


def _after_hashes(pattern: list[str], states: set[int]) -> set[int]:
    """Add the positions reached by letting each `#` match no word."""
    closed = set(states)
    pending = list(states)
    while pending:
        position = pending.pop()
        if position < len(pattern) and pattern[position] == "#" and position + 1 not in closed:
            closed.add(position + 1)
            pending.append(position + 1)
    return closed
