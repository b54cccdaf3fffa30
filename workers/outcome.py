"""What a Roistat call status means for the business: the call's outcome."""

from __future__ import annotations

from schemas.events import Outcome

OUTCOME_BY_STATUS: dict[str, Outcome] = {
    "ANSWER": "answered",
    "BUSY": "missed",
    "NOANSWER": "missed",
    "CANCEL": "missed",
    "CONGESTION": "failed",
    "CHANUNAVAIL": "failed",
    "DONTCALL": "blocked",
    "TORTURE": "blocked",
}


def outcome_for(status: str | None) -> Outcome | None:
    """The outcome of a status; None before the call has ended (no status yet)."""
    if status is None:
        return None
    return OUTCOME_BY_STATUS.get(status.strip().upper(), "unknown")


def is_missed(outcome: Outcome | None) -> bool | None:
    """A missed call is one a person should call back; unknown until the call has ended."""
    if outcome is None:
        return None
    return outcome == "missed"
