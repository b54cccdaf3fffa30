"""Decoding a call-queue message: the ingress's headers plus the raw body."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from schemas.topology import HEADER_KIND, HEADER_PROJECT, HEADER_RECEIVED_AT, Kind
from workers.delivery import decode_delivery
from workers.errors import PermanentError

BODY = orjson.dumps({"id": 2891473, "caller": "79990009911", "status": "ANSWER"})


def _headers(**overrides: str | None) -> dict[str, str]:
    headers: dict[str, str | None] = {
        HEADER_PROJECT: "shop",
        HEADER_KIND: "end",
        HEADER_RECEIVED_AT: "2024-03-10T11:30:05+00:00",
        **overrides,
    }
    return {key: value for key, value in headers.items() if value is not None}


def test_good_delivery() -> None:
    webhook = decode_delivery(BODY, _headers(), "end")
    assert webhook.project == "shop"
    assert webhook.kind == "end"
    assert webhook.received_at == datetime(2024, 3, 10, 11, 30, 5, tzinfo=UTC)
    assert webhook.call_id == "2891473"
    assert webhook.event_id == "shop:2891473:end"
    assert webhook.payload.caller == "79990009911"
    assert webhook.document == orjson.loads(BODY)


@pytest.mark.parametrize(
    ("kind_header", "queue_kind", "kind"),
    [
        pytest.param("start", "start", "start", id="start"),
        pytest.param("end", "end", "end", id="end"),
        pytest.param(None, "start", "start", id="no-header-start-queue"),
        pytest.param(None, "end", "end", id="no-header-end-queue"),
        pytest.param("start", "end", "start", id="header-wins-over-queue"),
    ],
)
def test_kind_and_event_id(kind_header: str | None, queue_kind: Kind, kind: Kind) -> None:
    webhook = decode_delivery(BODY, _headers(**{HEADER_KIND: kind_header}), queue_kind)
    assert webhook.kind == kind
    assert webhook.event_id == f"shop:2891473:{kind}"


def test_project_header_is_stripped() -> None:
    webhook = decode_delivery(BODY, _headers(**{HEADER_PROJECT: "  магазин "}), "end")
    assert webhook.project == "магазин"
    assert webhook.event_id == "магазин:2891473:end"


def test_string_call_id_is_stripped_in_the_event_id() -> None:
    webhook = decode_delivery(b'{"id": "  abc-1 "}', _headers(), "end")
    assert webhook.event_id == "shop:abc-1:end"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-10T11:30:05+00:00", datetime(2024, 3, 10, 11, 30, 5, tzinfo=UTC)),
        ("2024-03-10T11:30:05Z", datetime(2024, 3, 10, 11, 30, 5, tzinfo=UTC)),
        ("2024-03-10T11:30:05", datetime(2024, 3, 10, 11, 30, 5, tzinfo=UTC)),
        (
            "2024-03-10T14:30:05.123456+03:00",
            datetime(2024, 3, 10, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=3))),
        ),
    ],
)
def test_received_at(value: str, expected: datetime) -> None:
    received_at = decode_delivery(BODY, _headers(**{HEADER_RECEIVED_AT: value}), "end").received_at
    assert received_at == expected
    assert received_at.tzinfo is not None


def test_missing_received_at_is_now() -> None:
    before = datetime.now(UTC)
    received_at = decode_delivery(BODY, _headers(**{HEADER_RECEIVED_AT: None}), "end").received_at
    assert before <= received_at <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        pytest.param(_headers(**{HEADER_PROJECT: None}), BODY, HEADER_PROJECT, id="no-project"),
        pytest.param(_headers(**{HEADER_PROJECT: ""}), BODY, HEADER_PROJECT, id="empty-project"),
        pytest.param(_headers(**{HEADER_PROJECT: "  "}), BODY, HEADER_PROJECT, id="blank-project"),
        pytest.param(_headers(**{HEADER_KIND: "middle"}), BODY, "'middle'", id="bad-kind"),
        pytest.param(_headers(**{HEADER_KIND: "END"}), BODY, HEADER_KIND, id="upper-case-kind"),
        pytest.param(_headers(**{HEADER_KIND: ""}), BODY, HEADER_KIND, id="empty-kind"),
        pytest.param(
            _headers(**{HEADER_RECEIVED_AT: "yesterday"}), BODY, "ISO 8601", id="bad-received-at"
        ),
        pytest.param(
            _headers(**{HEADER_RECEIVED_AT: ""}), BODY, HEADER_RECEIVED_AT, id="empty-received-at"
        ),
        pytest.param(_headers(), b"", "not_json", id="empty-body"),
        pytest.param(_headers(), b"<xml/>", "not_json", id="not-json"),
        pytest.param(_headers(), b"\xff", "not_utf8", id="not-utf8"),
        pytest.param(_headers(), b"[" * 5000, "too_deep", id="too-deep"),
        pytest.param(_headers(), b"[1]", "not_object", id="array"),
        pytest.param(_headers(), b'{"caller": "7999"}', "missing_id", id="no-id"),
        pytest.param(_headers(), b'{"id": ""}', "missing_id", id="empty-id"),
    ],
)
def test_undeliverable_is_permanent_with_a_reason(
    headers: dict[str, str], body: bytes, reason: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        decode_delivery(body, headers, "end")
    assert reason in str(caught.value)


def test_body_error_keeps_its_cause() -> None:
    with pytest.raises(PermanentError) as caught:
        decode_delivery(b"{}", _headers(), "start")
    assert caught.value.__cause__ is not None
