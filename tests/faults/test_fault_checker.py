"""The fault suite's own pure parts: the checker's classification, the table, failpoint specs."""

from __future__ import annotations

from collections import Counter

import pytest
from fault_checker import (
    NO_ANSWER,
    OK,
    REFUSED,
    SPOOLED,
    Answer,
    Stored,
    classify,
    error_row,
    format_table,
    table_row,
)

from workers.failpoints import parse


def answer(call: str, kind: str, outcome: str = OK) -> Answer:
    return Answer(f"acme:{call}:{kind}", call, kind, outcome, seconds=0.01)


def stored(*event_ids: str, copies: int = 1, unpublished: tuple[str, ...] = ()) -> Stored:
    halves: dict[str, set[str]] = {}
    for event_id in event_ids:
        _, call, kind = event_id.split(":")
        halves.setdefault(call, set()).add(kind)
    return Stored(
        published=set(event_ids),
        unpublished=set(unpublished),
        halves=halves,
        revisions={call: len(kinds) for call, kinds in halves.items()},
        events=Counter({event_id: copies for event_id in event_ids}),
    )


def test_every_answered_webhook_stored_once_is_clean() -> None:
    answers = [answer("1", "start"), answer("1", "end", SPOOLED)]
    verdict = classify(answers, stored("acme:1:start", "acme:1:end"))
    assert (verdict.sent, verdict.ok, verdict.spooled, verdict.stored) == (2, 1, 1, 2)
    assert not verdict.lost and not verdict.duplicated and not verdict.unexpected


def test_an_answered_webhook_without_row_or_event_is_lost() -> None:
    answers = [answer("1", "start"), answer("2", "start", SPOOLED), answer("3", "start")]
    held = stored("acme:1:start", "acme:3:start")
    held.events["acme:3:start"] = 0  # stored, but its event never reached {ns}.events
    verdict = classify(answers, held)
    assert verdict.lost == ["acme:2:start", "acme:3:start"]


def test_refused_and_unanswered_webhooks_are_not_lost_when_missing() -> None:
    answers = [answer("1", "start", REFUSED), answer("2", "start", NO_ANSWER)]
    verdict = classify(answers, stored())
    assert (verdict.refused, verdict.no_answer, verdict.lost) == (1, 1, [])


def test_copies_of_an_event_are_duplicates_and_strangers_unexpected() -> None:
    answers = [answer("1", "start")]
    held = stored("acme:1:start", "acme:9:end", copies=2)
    verdict = classify(answers, held)
    assert verdict.duplicated == {"acme:1:start": 2, "acme:9:end": 2}
    assert "acme:9:end" in verdict.unexpected and "calls row 9" in verdict.unexpected


def test_a_row_whose_revision_disagrees_with_its_halves_is_unexpected() -> None:
    held = stored("acme:1:start")
    held.revisions["1"] = 2
    verdict = classify([answer("1", "start")], held)
    assert verdict.unexpected == ["calls row 1 revision 2 for 1 halves"]


def test_the_table_lines_up() -> None:
    verdict = classify([answer("1", "start")], stored("acme:1:start"))
    lines = format_table([table_row("a scenario", verdict, "none", "ok"), error_row("b", "ERR")])
    assert lines[0].startswith("scenario") and lines[0].endswith("verdict")
    assert len({len(line) for line in lines[:2]}) == 1
    cells = ["a", "scenario", "1", "1", "0", "0", "0", "1", "0", "0", "none", "0", "10", "ok"]
    assert lines[2].split() == cells


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("", None), ("store.after_confirm", ("store.after_confirm", 0)), ("x:40", ("x", 40))],
)
def test_failpoint_spec(spec: str, parsed: tuple[str, int] | None) -> None:
    assert parse(spec) == parsed
