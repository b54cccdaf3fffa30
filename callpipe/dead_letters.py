"""What a dead letter or a rejected body is, and where requeueing sends it: pure.

Dead letters come from three places: a worker that gave up on a call webhook (routing key
`roistat.call.*`, reason in `x-callpipe-error`), a sink that gave up on an event (header
`x-callpipe-sink`, the event's routing key in `x-callpipe-routing-key`), and the broker
itself, for a message over a queue's delivery limit (`x-death`, `x-first-death-queue`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from callpipe.letters import (
    HEADER_REQUEUED_AT,
    Letter,
    age_seconds,
    canonical_value,
    format_age,
    without,
)
from callpipe.queue_scan import Target
from infra.masking import mask_text, masked, masked_phones, phones_in
from schemas.roistat import InvalidWebhookError, call_id_of, detect_kind, read_webhook
from schemas.topology import (
    HEADER_ATTEMPT,
    HEADER_ERROR,
    HEADER_KIND,
    HEADER_PROJECT,
    HEADER_RECEIVED_AT,
    HEADER_REJECT_REASON,
    HEADER_REMOTE_ADDR,
    HEADER_ROUTING_KEY,
    HEADER_SINK,
    KINDS,
    ROUTING_KEY_BY_KIND,
    ROUTING_KEY_REJECTED,
    Kind,
    Topology,
    event_id,
)
from sinks.topology import sink_of_queue

# Sent back to `{ns}.webhooks`: the call queues feed the workers, `roistat.rejected` goes
# back to `{ns}.rejected` (a rejected body the broker dead-lettered), where
# `callpipe rejected requeue` validates it.
WEBHOOK_ROUTING_KEYS = frozenset({*ROUTING_KEY_BY_KIND.values(), ROUTING_KEY_REJECTED})
# What the broker, the workers and the sinks added on the way to `{ns}.dead`.
DEATH_HEADERS = frozenset(
    {
        HEADER_ERROR,
        HEADER_SINK,
        HEADER_ATTEMPT,  # a sink's attempts start again from 1
        "x-death",
        "x-delivery-count",
        "x-acquired-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
REASON_WIDTH = 72


@dataclass(frozen=True)
class Keep:
    """Not requeued: why."""

    reason: str


@dataclass(frozen=True)
class Row:
    id: str
    age: str
    source: str
    call_id: str
    phones: str
    reason: str


def death_queue(letter: Letter) -> str | None:
    """The queue the broker dead-lettered it from, if the broker did."""
    first = letter.text("x-first-death-queue")
    if first:
        return first
    deaths = letter.deaths
    queue = deaths[-1].get("queue") if deaths else None
    if isinstance(queue, bytes):
        return queue.decode("utf-8", "replace")
    return queue if isinstance(queue, str) else None


def dead_source(letter: Letter, topology: Topology) -> str:
    """Where it died: `sink:NAME`, the queue the broker names, or the worker's queue."""
    sink = letter.text(HEADER_SINK)
    if sink:
        return f"sink:{sink}"
    queue = death_queue(letter)
    if queue:
        return queue
    routing_key = letter.effective_routing_key
    for kind, key in ROUTING_KEY_BY_KIND.items():
        if routing_key == key:
            return topology.call_queue(kind)
    return topology.rejected_queue if routing_key == ROUTING_KEY_REJECTED else "?"


def dead_reason(letter: Letter) -> str:
    error = letter.text(HEADER_ERROR)
    if error:
        return error
    broker = letter.text("x-first-death-reason")
    if not broker and letter.deaths:
        broker = _text(letter.deaths[-1].get("reason"))
    return f"broker: {broker}" if broker else "-"


def rejected_reason(letter: Letter) -> str:
    return letter.text(HEADER_REJECT_REASON) or "-"


def call_id_in(document: Any) -> str | None:
    """The call id of a webhook body or of an event envelope."""
    if not isinstance(document, dict):
        return None
    call = document.get("call")
    if "event_id" in document and isinstance(call, dict):
        return call_id_of(call.get("call_id"))
    return call_id_of(document.get("id"))


def row(letter: Letter, source: str, reason: str, now: datetime) -> Row:
    """One line of `list`: phones masked, always; the reason masked too (it may quote data)."""
    document = letter.document()
    call_id = call_id_in(document)
    one_line = " ".join(mask_text(reason).split())
    if len(one_line) > REASON_WIDTH:
        one_line = one_line[: REASON_WIDTH - 1] + "…"
    return Row(
        id=letter.id,
        age=format_age(age_seconds(letter, now)),
        source=source,
        call_id=call_id if call_id is not None else "-",
        phones=",".join(masked_phones(document, letter.body)) or "-",
        reason=one_line,
    )


def dead_row(letter: Letter, topology: Topology, now: datetime) -> Row:
    return row(letter, dead_source(letter, topology), dead_reason(letter), now)


def rejected_row(letter: Letter, now: datetime) -> Row:
    return row(letter, letter.text(HEADER_PROJECT) or "?", rejected_reason(letter), now)


def dead_target(letter: Letter, topology: Topology, now: datetime) -> Target | Keep:
    """Where `callpipe dead requeue` sends a dead letter, or why it keeps it."""
    stamp = {HEADER_REQUEUED_AT: now.isoformat()}
    routing_key = letter.effective_routing_key
    cleaned = without(letter.headers, DEATH_HEADERS | {HEADER_ROUTING_KEY})
    queue = death_queue(letter)
    # A sink names itself when it gives up; the broker's delivery limit names only the queue.
    sink = letter.text(HEADER_SINK) or sink_of_queue(topology, queue)
    if sink is not None:
        document = letter.document()
        if not (isinstance(document, dict) and document.get("event_id")):
            return Keep(f"sink {sink} gave it up as not an event: requeueing cannot help")
        try:
            sink_queue = topology.sink_queue(sink)
        except ValueError:
            return Keep(f"header {HEADER_SINK} is {sink!r}, not a sink's name")
        headers = {**cleaned, HEADER_ROUTING_KEY: routing_key, **stamp}
        return Target("", sink_queue, letter.message_id, headers)
    if routing_key in WEBHOOK_ROUTING_KEYS:
        return Target(
            topology.webhooks_exchange, routing_key, letter.message_id, {**cleaned, **stamp}
        )
    if queue and queue.startswith(f"{topology.namespace}.sub."):
        headers = {**cleaned, HEADER_ROUTING_KEY: routing_key, **stamp}
        return Target("", queue, letter.message_id, headers)
    return Keep("not a call webhook, a sink's event or a subscription's event")


def rejected_target(letter: Letter, topology: Topology, now: datetime) -> Target | Keep:
    """A rejected body that the ingress would accept today, as the ingress would publish it;
    else why it stays."""
    project = letter.text(HEADER_PROJECT)
    if not project:
        return Keep(f"no {HEADER_PROJECT} header: its project is unknown")
    try:
        document = read_webhook(letter.body)
    except InvalidWebhookError as exc:
        return Keep(f"still invalid ({exc.reason}): {exc.message}")
    given = letter.text(HEADER_KIND)
    kind: Kind = next((k for k in KINDS if k == given), detect_kind(document))
    call_id = call_id_of(document["id"])
    assert call_id is not None  # read_webhook guarantees a usable id
    headers = {
        HEADER_PROJECT: project,
        HEADER_KIND: kind,
        HEADER_RECEIVED_AT: letter.text(HEADER_RECEIVED_AT) or now.isoformat(),
        HEADER_REMOTE_ADDR: letter.text(HEADER_REMOTE_ADDR) or "",
        HEADER_REQUEUED_AT: now.isoformat(),
    }
    return Target(
        topology.webhooks_exchange,
        ROUTING_KEY_BY_KIND[kind],
        event_id(project, call_id, kind),
        headers,
    )


def describe(
    letter: Letter, source: str, reason: str, now: datetime, *, unmasked: bool
) -> list[str]:
    """`show`: everything about one message; phones masked unless `unmasked`."""
    shown = row(letter, source, reason, now)
    headers = canonical_value(dict(letter.headers))
    document = letter.document()
    if document is not None:
        body = json.dumps(document if unmasked else masked(document), indent=2, ensure_ascii=False)
    else:
        text = letter.body.decode("utf-8", "replace")
        body = text if unmasked else mask_text(text)
    phones = ",".join(phones_in(document, letter.body)) or "-" if unmasked else shown.phones
    lines = [
        f"id:          {shown.id}",
        f"age:         {shown.age}",
        f"source:      {source}",
        f"call id:     {shown.call_id}",
        f"phones:      {phones}",
        f"reason:      {_one_line(reason if unmasked else mask_text(reason))}",
        f"message id:  {letter.message_id or '-'}",
        f"routing key: {letter.effective_routing_key or '-'}",
        "headers:",
    ]
    for name in sorted(headers):
        value = headers[name]
        rendered = json.dumps(value if unmasked else masked(value), ensure_ascii=False)
        lines.append(f"  {name}: {rendered}")
    lines += [f"body ({len(letter.body)} bytes):", body]
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
