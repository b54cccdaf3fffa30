"""Topic exchange routing cases, shared by the matcher's unit test and its check on RabbitMQ."""

from __future__ import annotations

# (binding key, routing key, routed?)
TOPIC_TABLE: list[tuple[str, str, bool]] = [
    ("call.started", "call.started", True),
    ("call.started", "call.ended.missed", False),
    ("call.started", "call.started.x", False),
    ("call.started", "call", False),
    ("Call.started", "call.started", False),  # case-sensitive
    ("call.ended.*", "call.ended.missed", True),
    ("call.ended.*", "call.ended", False),
    ("call.ended.*", "call.ended.missed.x", False),
    ("call.ended.*", "call.started", False),
    ("call.*", "call.started", True),
    ("call.*", "call.ended.missed", False),
    ("*.*.missed", "call.ended.missed", True),
    ("*", "call", True),
    ("*", "call.started", False),
    ("*", "", False),
    ("#", "", True),
    ("#", "call", True),
    ("#", "call.ended.missed", True),
    ("call.#", "call", True),  # `#` matches zero words
    ("call.#", "call.started", True),
    ("call.#", "call.ended.missed", True),
    ("call.#", "calls.started", False),
    ("#.missed", "call.ended.missed", True),
    ("#.missed", "missed", True),
    ("#.missed", "call.ended.answered", False),
    ("call.#.missed", "call.missed", True),
    ("call.#.missed", "call.ended.missed", True),
    ("call.#.missed", "call.a.b.c.missed", True),
    ("call.#.missed", "call.ended.missed.x", False),
    ("call.*.#", "call", False),
    ("call.*.#", "call.started", True),
    ("call.*.#", "call.ended.missed", True),
    ("#.*", "", False),
    ("#.*", "call", True),
    ("#.#", "call.ended", True),
    ("#.ended.#", "call.ended.missed", True),
    ("#.ended.#", "call.started", False),
    ("*.#.*", "call", False),
    ("*.#.*", "call.ended", True),
    ("call.*", "call.", True),  # an empty word is still a word
]
