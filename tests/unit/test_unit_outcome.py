"""Roistat statuses to outcomes, as DESIGN.md lists them."""

from __future__ import annotations

import pytest

from schemas.events import Outcome
from workers.outcome import OUTCOME_BY_STATUS, is_missed, outcome_for

DESIGN_TABLE: dict[str, Outcome] = {
    "ANSWER": "answered",
    "BUSY": "missed",
    "NOANSWER": "missed",
    "CANCEL": "missed",
    "CONGESTION": "failed",
    "CHANUNAVAIL": "failed",
    "DONTCALL": "blocked",
    "TORTURE": "blocked",
}


@pytest.mark.parametrize(("status", "outcome"), DESIGN_TABLE.items())
def test_every_documented_status(status: str, outcome: Outcome) -> None:
    assert outcome_for(status) == outcome


def test_no_status_beyond_the_documented_ones() -> None:
    assert OUTCOME_BY_STATUS == DESIGN_TABLE


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("answer", "answered"),
        ("Busy", "missed"),
        (" NOANSWER ", "missed"),
        ("cancel\n", "missed"),
        ("chanunavail", "failed"),
        ("\tdontcall", "blocked"),
    ],
)
def test_case_and_whitespace_do_not_matter(status: str, outcome: Outcome) -> None:
    assert outcome_for(status) == outcome


@pytest.mark.parametrize(
    "status", ["", " ", "VOICEMAIL", "ANSWERED", "NO ANSWER", "ОТВЕЧЕН", "200", "ANSWER;BUSY"]
)
def test_anything_else_is_unknown(status: str) -> None:
    assert outcome_for(status) == "unknown"


def test_no_status_yet_is_no_outcome() -> None:
    assert outcome_for(None) is None


@pytest.mark.parametrize(
    ("outcome", "missed"),
    [
        ("missed", True),
        ("answered", False),
        ("failed", False),
        ("blocked", False),
        ("unknown", False),
        (None, None),
    ],
)
def test_is_missed(outcome: Outcome | None, missed: bool | None) -> None:
    assert is_missed(outcome) is missed
