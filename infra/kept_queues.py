"""Size bounds of the queues kept for humans, `{ns}.dead` and `{ns}.rejected`.

`x-overflow` does nothing without a length, and anyone holding a token can send junk. A queue
declared before these bounds existed cannot take them as arguments (RabbitMQ refuses a
re-declare with other arguments), so for those the bound is a policy the operator sets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from infra.settings import Settings
from schemas.topology import Topology

Overflow = Literal["reject-publish", "drop-head"]

# Above whatever catch-all policy an operator may have; only one policy applies to a queue.
POLICY_PRIORITY = 10


@dataclass(frozen=True)
class QueueBound:
    """At most this many messages and bytes (0: no bound of that kind), and what happens then."""

    max_messages: int
    max_bytes: int
    # dead: a refused publish keeps the message with whoever dead-letters it (nothing lost);
    # rejected: the oldest junk goes, so a flood of bad bodies can never block the ingress.
    overflow: Overflow

    def describe(self) -> str:
        limits = [
            f"{self.max_messages} messages" if self.max_messages else "",
            f"{self.max_bytes} bytes" if self.max_bytes else "",
        ]
        shown = " / ".join(part for part in limits if part) or "no size limit"
        return f"{shown}, overflow {self.overflow}"


@dataclass(frozen=True)
class KeptQueueBounds:
    dead: QueueBound
    rejected: QueueBound

    @classmethod
    def of(
        cls, dead_messages: int, dead_bytes: int, rejected_messages: int, rejected_bytes: int
    ) -> KeptQueueBounds:
        return cls(
            QueueBound(dead_messages, dead_bytes, "reject-publish"),
            QueueBound(rejected_messages, rejected_bytes, "drop-head"),
        )

    def for_queue(self, topology: Topology, name: str) -> QueueBound:
        return self.dead if name == topology.dead_queue else self.rejected


def bounds_of(settings: Settings) -> KeptQueueBounds:
    """`CALLPIPE_DEAD_MAX_MESSAGES`, `_DEAD_MAX_BYTES`, `_REJECTED_MAX_MESSAGES`, `_BYTES`."""
    return KeptQueueBounds.of(
        settings.dead_max_messages,
        settings.dead_max_bytes,
        settings.rejected_max_messages,
        settings.rejected_max_bytes,
    )


def kept_queue_arguments(bound: QueueBound) -> dict[str, Any]:
    """Arguments of a new kept queue: quorum, bounded, and no delivery limit or dead-letter
    target, so reading it (get and requeue) can never push a message anywhere."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum", "x-overflow": bound.overflow}
    if bound.max_messages:
        arguments["x-max-length"] = bound.max_messages
    if bound.max_bytes:
        arguments["x-max-length-bytes"] = bound.max_bytes
    return arguments


def policy_definition(bound: QueueBound) -> dict[str, Any]:
    definition: dict[str, Any] = {"overflow": bound.overflow}
    if bound.max_messages:
        definition["max-length"] = bound.max_messages
    if bound.max_bytes:
        definition["max-length-bytes"] = bound.max_bytes
    return definition


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (`/` when the path is empty)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def policy_command(queue: str, bound: QueueBound, vhost: str) -> str:
    """The `rabbitmqctl set_policy` line that bounds one existing queue."""
    name = queue.replace(".", "-") + "-bound"
    pattern = "^" + re.escape(queue) + "$"
    definition = json.dumps(policy_definition(bound), separators=(",", ":"))
    return (
        f"rabbitmqctl set_policy -p '{vhost}' --apply-to queues --priority {POLICY_PRIORITY} "
        f"{name} '{pattern}' '{definition}'"
    )


# The settings' own defaults (no environment read): for callers without settings (tests, benches).
DEFAULT_BOUNDS = bounds_of(Settings.model_construct())
