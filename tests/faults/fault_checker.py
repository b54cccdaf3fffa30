"""The checker: every webhook sent, what it was answered, and what became of it. Pure.

As RabbitMQ's Jepsen checker does for its queue: after the fault, recovery and a full drain,
each id sent is classified against what storage and the event stream hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

OK = "200"
SPOOLED = "spooled"
REFUSED = "refused"
NO_ANSWER = "no answer"


@dataclass(frozen=True)
class Answer:
    """One webhook of the load and what the ingress answered."""

    event_id: str
    call_id: str
    kind: str
    outcome: str  # OK, SPOOLED, REFUSED or NO_ANSWER
    detail: str = ""
    seconds: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.outcome in (OK, SPOOLED)


@dataclass(frozen=True)
class Stored:
    """What the namespace holds after the drain."""

    published: set[str]  # call_events rows with published_at set
    unpublished: set[str]  # call_events rows without it
    halves: dict[str, set[str]]  # call_id -> kinds its calls row says were received
    revisions: dict[str, int]  # call_id -> calls.revision
    events: Counter[str]  # event_id -> copies seen on {ns}.events
    mislabelled: int = 0  # events whose message_id is not their body's event_id


@dataclass
class Verdict:
    sent: int = 0
    ok: int = 0
    spooled: int = 0
    refused: int = 0
    no_answer: int = 0
    stored: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)  # event_id -> copies
    unexpected: list[str] = field(default_factory=list)
    p99_ms: float = 0.0
    unanswered: list[str] = field(default_factory=list)  # "event_id: what the client saw"

    @property
    def duplicate_copies(self) -> int:
        return max(self.duplicated.values(), default=1)


def classify(answers: Iterable[Answer], stored: Stored) -> Verdict:
    answers = list(answers)
    verdict = Verdict(sent=len(answers))
    outcomes = Counter(answer.outcome for answer in answers)
    verdict.ok, verdict.spooled = outcomes[OK], outcomes[SPOOLED]
    verdict.refused, verdict.no_answer = outcomes[REFUSED], outcomes[NO_ANSWER]
    verdict.unanswered = [
        f"{a.event_id}: {a.detail}" for a in answers if a.outcome in (REFUSED, NO_ANSWER)
    ]
    sent_ids = {answer.event_id for answer in answers}
    sent_calls = {answer.call_id for answer in answers}

    def is_stored(answer: Answer) -> bool:
        return (
            answer.event_id in stored.published
            and answer.kind in stored.halves.get(answer.call_id, set())
            and stored.events[answer.event_id] >= 1
        )

    verdict.stored = sum(1 for answer in answers if is_stored(answer))
    verdict.lost = sorted(a.event_id for a in answers if a.accepted and not is_stored(a))
    verdict.duplicated = {
        event_id: copies for event_id, copies in stored.events.items() if copies > 1
    }
    unexpected = (stored.published | stored.unpublished | set(stored.events)) - sent_ids
    unexpected |= {f"calls row {call_id}" for call_id in set(stored.halves) - sent_calls}
    # A call row counts each stored half once: revision 2 for both halves, never 3.
    unexpected |= {
        f"calls row {call_id} revision {revision} for {len(stored.halves[call_id])} halves"
        for call_id, revision in stored.revisions.items()
        if call_id in stored.halves and revision != len(stored.halves[call_id])
    }
    unexpected |= {
        f"{a.event_id} stored but unpublished" for a in answers if a.event_id in stored.unpublished
    }
    if stored.mislabelled:
        unexpected.add(f"{stored.mislabelled} events whose message_id is not their event_id")
    verdict.unexpected = sorted(unexpected)
    latencies = sorted(a.seconds for a in answers if a.outcome != NO_ANSWER)
    if latencies:
        verdict.p99_ms = 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return verdict


COLUMNS = (
    "scenario",
    "sent",
    "200",
    "spooled",
    "refused",
    "no answer",
    "stored",
    "lost",
    "dup events",
    "dups allowed",
    "unexpected",
    "p99 ms",
    "verdict",
)


def table_row(scenario: str, verdict: Verdict, allowed: str, result: str) -> tuple[str, ...]:
    duplicates = str(len(verdict.duplicated))
    if verdict.duplicated:
        duplicates += f" (x{verdict.duplicate_copies})"
    return (
        scenario,
        str(verdict.sent),
        str(verdict.ok),
        str(verdict.spooled),
        str(verdict.refused),
        str(verdict.no_answer),
        str(verdict.stored),
        str(len(verdict.lost)),
        duplicates,
        allowed,
        str(len(verdict.unexpected)),
        f"{verdict.p99_ms:.0f}",
        result,
    )


def error_row(scenario: str, result: str) -> tuple[str, ...]:
    """The row of a scenario that could not be checked."""
    return (scenario, *["-"] * (len(COLUMNS) - 2), result)


TEXT_COLUMNS = {0, COLUMNS.index("dups allowed"), len(COLUMNS) - 1}


def format_table(rows: Iterable[tuple[str, ...]]) -> list[str]:
    """Aligned text lines: numbers right-aligned, text left-aligned."""
    rows = [COLUMNS, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.ljust(width) if i in TEXT_COLUMNS else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(rows[0]), "  ".join("-" * width for width in widths), *map(line, rows[1:])]
