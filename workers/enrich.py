"""Turn a lenient Roistat payload into the normalized fields of a call. Pure: no I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from schemas.events import CallFields
from schemas.roistat import CallEndPayload
from workers.outcome import is_missed, outcome_for
from workers.phones import normalize_phone

_EPOCH_MIN = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
_EPOCH_MS_MIN = _EPOCH_MIN * 1000


def parse_call_time(value: str | None, tz: ZoneInfo) -> datetime | None:
    """Roistat's `date` (`YYYY-MM-DD HH:MM:SS` in the project's time zone) as UTC.

    Drift is accepted: an ISO 8601 time with its own offset keeps it, and a Unix
    timestamp in seconds is read as such. Anything unreadable is None.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds > _EPOCH_MS_MIN:
            seconds /= 1000  # a timestamp in milliseconds
        if seconds < _EPOCH_MIN:
            return None
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 shifted past the calendar's edge
        return None


def enrich(payload: CallEndPayload, *, region: str, tz: ZoneInfo) -> CallFields:
    """The call fields this webhook knows, normalized; repeat-caller fields are left to storage."""
    caller = normalize_phone(payload.caller, region)
    callee = normalize_phone(payload.callee, region)
    outcome = outcome_for(payload.status)
    return CallFields(
        call_id=payload.id,
        caller=caller.e164 if caller else None,
        callee=callee.e164 if callee else None,
        called_at=parse_call_time(payload.date, tz),
        status=payload.status,
        outcome=outcome,
        duration_s=payload.duration,
        is_missed=is_missed(outcome),
        recording_url=payload.link,
        file_id=payload.file_id,
        visit_id=payload.visit_id,
        order_id=payload.order_id,
        marker=payload.marker,
        source_level_1=payload.source_level_1,
        source_level_2=payload.source_level_2,
        utm_source=payload.utm_source,
        utm_medium=payload.utm_medium,
        utm_campaign=payload.utm_campaign,
        utm_term=payload.utm_term,
        utm_content=payload.utm_content,
        roistat_param_1=payload.roistat_param_1,
        roistat_param_2=payload.roistat_param_2,
        roistat_param_3=payload.roistat_param_3,
        roistat_param_4=payload.roistat_param_4,
        roistat_param_5=payload.roistat_param_5,
        landing_page=payload.landing_page,
        domain=payload.domain,
        referrer=payload.referrer,
        first_visit=payload.first_visit,
        city=payload.city,
        country=payload.country,
        ip=payload.ip,
        google_client_id=payload.google_client_id,
        metrika_client_id=payload.metrika_client_id,
        custom_fields=payload.custom_fields,
        caller_region=caller.region if caller else None,
        caller_carrier=caller.carrier if caller else None,
    )
