"""What a missed-call alert and its follow-up say. Pure: no I/O."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

# Telegram's limit is 4096 characters; long landing pages are cut well before that.
MAX_FIELD = 300


def _field(value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = str(value)
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 1] + "…"


def local_time(value: Any, tz: ZoneInfo) -> str | None:
    """An event's RFC 3339 UTC time as `25.11.2026 10:03` in the project's zone."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.astimezone(tz).strftime("%d.%m.%Y %H:%M")


def source_of(call: dict[str, Any]) -> str | None:
    """Roistat's source levels, else the UTM source and campaign, else the marker."""
    levels = [call.get("source_level_1"), call.get("source_level_2")]
    utm = [call.get("utm_source"), call.get("utm_campaign")]
    for parts in (levels, utm):
        present = [str(part) for part in parts if part]
        if present:
            return " / ".join(present)
    return _field(call.get("marker"))


def missed_call_text(project: str, call: dict[str, Any], tz: ZoneInfo) -> str:
    """The alert: who called whom, when (local time), from which source and page."""
    when = local_time(call.get("called_at"), tz)
    lines = [
        "📵 Missed call",
        f"From: {_field(call.get('caller')) or 'unknown number'}",
        f"To: {_field(call.get('callee')) or 'unknown'}",
        f"When: {when} ({tz.key})" if when else "When: unknown",
    ]
    optional = {
        "Source": _field(source_of(call)),
        "Landing page": _field(call.get("landing_page")),
        "Status": _field(call.get("status")),
    }
    lines += [f"{label}: {value}" for label, value in optional.items() if value]
    lines.append(f"Project: {project} · call {_field(call.get('call_id'))}")
    return "\n".join(lines)


def followed_up_text(alert_text: str, answered: dict[str, Any], tz: ZoneInfo) -> str:
    """The alert edited once the same caller got through: the team sees it is closed."""
    when = local_time(answered.get("called_at"), tz) or "later"
    duration = answered.get("duration_s")
    talk = f", talked {duration // 60}:{duration % 60:02d}" if isinstance(duration, int) else ""
    return (
        f"{alert_text}\n\n✅ Reached: the caller got through at {when}{talk} "
        f"(call {_field(answered.get('call_id'))})"
    )
