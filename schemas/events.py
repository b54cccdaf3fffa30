"""The enriched event envelope (`callpipe.call.v1`) that workers publish to `{ns}.events`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.topology import Kind

SCHEMA_VERSION: Final = "callpipe.call.v1"

EventType = Literal["call.started", "call.ended", "call.stale"]
EVENT_TYPE_BY_KIND: dict[Kind, EventType] = {"start": "call.started", "end": "call.ended"}
# Not a webhook: a call start with no call end after CALLPIPE_STALE_AFTER_MIN (workers/stale.py).
STALE_EVENT_TYPE: Final = "call.stale"

Outcome = Literal["answered", "missed", "failed", "blocked", "unknown"]


class CallFields(BaseModel):
    """The public columns of a `calls` row (None: not known).

    Enrichment fills what one webhook knows; the event carries the merged row as it stands
    after that webhook, so the storage-only fields below are set there.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    call_id: str
    caller: str | None = None
    callee: str | None = None
    called_at: datetime | None = None
    status: str | None = None
    outcome: Outcome | None = None
    duration_s: int | None = None
    is_missed: bool | None = None
    recording_url: str | None = None
    file_id: str | None = None
    visit_id: str | None = None
    order_id: str | None = None
    marker: str | None = None
    source_level_1: str | None = None
    source_level_2: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    utm_term: str | None = None
    utm_content: str | None = None
    roistat_param_1: str | None = None
    roistat_param_2: str | None = None
    roistat_param_3: str | None = None
    roistat_param_4: str | None = None
    roistat_param_5: str | None = None
    landing_page: str | None = None
    domain: str | None = None
    referrer: str | None = None
    first_visit: str | None = None
    city: str | None = None
    country: str | None = None
    ip: str | None = None
    google_client_id: str | None = None
    metrika_client_id: str | None = None
    custom_fields: list[Any] | dict[str, Any] | None = None
    caller_region: str | None = None
    caller_carrier: str | None = None
    # Known once the call row exists: set by storage, not by the webhook.
    is_repeat_caller: bool | None = None
    previous_calls: int | None = None
    # Webhooks of this call stored so far, this one included: 1 or 2. Of two events of one
    # call, the one with the higher revision carries the newer row, whatever arrives first.
    revision: int | None = None
    start_received_at: datetime | None = None
    end_received_at: datetime | None = None
    # When the call was marked stale (a start, no end in time); kept if the end comes later.
    stale_at: datetime | None = None


class CallEvent(BaseModel):
    """One event per accepted webhook; subscribers dedupe by `event_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    event_id: str
    type: EventType
    schema_: Literal["callpipe.call.v1"] = Field(default=SCHEMA_VERSION, alias="schema")
    occurred_at: datetime | None
    received_at: datetime
    project: str
    call: CallFields
    raw: dict[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        """The envelope as published: `schema` on the wire, datetimes as strings."""
        return self.model_dump(mode="json", by_alias=True)
