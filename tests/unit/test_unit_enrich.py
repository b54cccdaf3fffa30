"""Enrichment: Roistat's local time to UTC, and a payload to the normalized call fields."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from schemas.events import CallFields
from schemas.roistat import parse_webhook
from workers.enrich import enrich, parse_call_time

MOSCOW = ZoneInfo("Europe/Moscow")
YEKATERINBURG = ZoneInfo("Asia/Yekaterinburg")


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        pytest.param("2024-03-10 14:30:00", MOSCOW, _utc(2024, 3, 10, 11, 30), id="roistat-msk"),
        pytest.param(
            "2024-03-10 14:30:00", YEKATERINBURG, _utc(2024, 3, 10, 9, 30), id="roistat-ekb"
        ),
        pytest.param("2024-07-01 02:00:00", MOSCOW, _utc(2024, 6, 30, 23, 0), id="day-before"),
        # Moscow kept summer time until 2011: the zone database, not a fixed +03:00.
        pytest.param("2010-07-01 12:00:00", MOSCOW, _utc(2010, 7, 1, 8, 0), id="msk-2010-summer"),
        pytest.param("2010-01-01 12:00:00", MOSCOW, _utc(2010, 1, 1, 9, 0), id="msk-2010-winter"),
        pytest.param(" 2024-03-10 14:30:00 ", MOSCOW, _utc(2024, 3, 10, 11, 30), id="padded"),
        pytest.param("2024-03-10T14:30:00", MOSCOW, _utc(2024, 3, 10, 11, 30), id="iso-naive"),
        pytest.param(
            "2024-03-10T14:30:00+05:00", MOSCOW, _utc(2024, 3, 10, 9, 30), id="iso-own-offset"
        ),
        pytest.param("2024-03-10T14:30:00Z", MOSCOW, _utc(2024, 3, 10, 14, 30), id="iso-z"),
        pytest.param(
            "2024-03-10 14:30:00-04:00", MOSCOW, _utc(2024, 3, 10, 18, 30), id="negative-offset"
        ),
        pytest.param("1700000000", MOSCOW, _utc(2023, 11, 14, 22, 13, 20), id="unix-seconds"),
        pytest.param(" 1700000000 ", MOSCOW, _utc(2023, 11, 14, 22, 13, 20), id="unix-padded"),
        pytest.param("1700000000000", MOSCOW, _utc(2023, 11, 14, 22, 13, 20), id="unix-millis"),
        pytest.param(
            "1700000000.5",
            MOSCOW,
            datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC),
            id="unix-fraction",
        ),
        pytest.param("1700000000", YEKATERINBURG, _utc(2023, 11, 14, 22, 13, 20), id="unix-no-tz"),
    ],
)
def test_parse_call_time(value: str, tz: ZoneInfo, expected: datetime) -> None:
    parsed = parse_call_time(value, tz)
    assert parsed == expected
    assert parsed is not None
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "garbage",
        "вчера",
        "10.03.2024 14:30",
        "2024-13-01 00:00:00",
        "2024-02-30 12:00:00",
        "5",  # a number, but no plausible Unix time
        "-1700000000",
        "nan",
        "inf",
        "1e30",
        "0001-01-01 00:00:00",
        "9999-12-31T23:59:59-05:00",
    ],
)
def test_unreadable_time_is_none(value: str | None) -> None:
    assert parse_call_time(value, MOSCOW) is None


def _roistat_document(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": "2891473",
        "caller": "89990009911",
        "callee": "+7 (495) 123-45-67",
        "visit_id": 615123,
        "marker": "yandex_direct_smm",
        "order_id": 48213,
        "date": "2024-03-10 14:30:00",
        "google_client_id": "1284823445.1710000000",
        "metrika_client_id": "1710000000123456789",
        "custom_fields": [{"name": "Менеджер", "value": "Иван"}],
        "landing_page": "https://example.ru/каталог",
        "domain": "example.ru",
        "city": "Москва",
        "country": "Россия",
        "ip": "95.31.0.1",
        "first_visit": "2024-03-01 10:00:00",
        "referrer": "https://yandex.ru/",
        "utm_source": "yandex",
        "utm_medium": "cpc",
        "utm_campaign": "весна",
        "utm_term": "",
        "utm_content": None,
        "roistat_param_1": "p1",
        "source_level_1": "Яндекс.Директ",
        "source_level_2": "Кампания 1",
    }
    document.update(overrides)
    return document


def _enrich(document: dict[str, Any], tz: ZoneInfo = MOSCOW) -> CallFields:
    webhook = parse_webhook(orjson.dumps(document), "end" if "status" in document else "start")
    return enrich(webhook.payload, region="RU", tz=tz)


def test_enrich_call_start() -> None:
    call = _enrich(_roistat_document())
    assert call.call_id == "2891473"
    assert call.caller == "+79990009911"
    assert call.callee == "+74951234567"
    assert call.called_at == _utc(2024, 3, 10, 11, 30)
    assert call.visit_id == "615123"
    assert call.order_id == "48213"
    assert call.marker == "yandex_direct_smm"
    assert call.custom_fields == [{"name": "Менеджер", "value": "Иван"}]
    assert call.landing_page == "https://example.ru/каталог"
    assert call.city == "Москва"
    assert call.utm_campaign == "весна"
    assert call.utm_term is None
    assert call.utm_content is None
    assert call.source_level_1 == "Яндекс.Директ"
    assert call.caller_region == "Россия"
    assert call.first_visit == "2024-03-01 10:00:00"
    assert call.roistat_param_1 == "p1"
    assert call.roistat_param_2 is None
    # A call start knows nothing of the result, nor (yet) of the caller's history.
    for unknown in ("status", "outcome", "duration_s", "is_missed", "recording_url", "file_id"):
        assert getattr(call, unknown) is None, unknown
    for stored in ("is_repeat_caller", "previous_calls", "revision", "start_received_at"):
        assert getattr(call, stored) is None, stored


def test_enrich_call_end() -> None:
    call = _enrich(
        _roistat_document(
            status="NOANSWER",
            duration="0",
            file_id=98765,
            link="https://cloud.roistat.com/call/98765.mp3",
        )
    )
    assert call.status == "NOANSWER"
    assert call.outcome == "missed"
    assert call.is_missed is True
    assert call.duration_s == 0
    assert call.file_id == "98765"
    assert call.recording_url == "https://cloud.roistat.com/call/98765.mp3"
    assert call.caller == "+79990009911"
    assert call.called_at == _utc(2024, 3, 10, 11, 30)


@pytest.mark.parametrize(
    ("status", "outcome", "missed"),
    [
        ("ANSWER", "answered", False),
        ("busy", "missed", True),
        ("CHANUNAVAIL", "failed", False),
        ("TORTURE", "blocked", False),
        ("NEW_STATUS", "unknown", False),
    ],
)
def test_enrich_keeps_status_verbatim_and_maps_outcome(
    status: str, outcome: str, missed: bool
) -> None:
    call = _enrich(_roistat_document(status=status, duration=35))
    assert call.status == status
    assert call.outcome == outcome
    assert call.is_missed is missed


def test_enrich_reads_roistat_params_leniently() -> None:
    call = _enrich(
        _roistat_document(
            roistat_param_1=" с пробелами ",
            roistat_param_2=17,
            roistat_param_3="",
            roistat_param_4=None,
            roistat_param_5=2.5,
            first_visit=1709276400,
        )
    )
    params = [getattr(call, f"roistat_param_{n}") for n in range(1, 6)]
    assert params == ["с пробелами", "17", None, None, "2.5"]
    assert call.first_visit == "1709276400"


def test_enrich_uses_the_project_time_zone() -> None:
    call = _enrich(_roistat_document(), tz=YEKATERINBURG)
    assert call.called_at == _utc(2024, 3, 10, 9, 30)


def test_enrich_minimal_payload() -> None:
    call = _enrich({"id": 17})
    assert call == CallFields(call_id="17")


def test_enrich_hidden_caller_has_no_phone_fields() -> None:
    call = _enrich(_roistat_document(caller="anonymous", date="не дата"))
    assert call.caller is None
    assert call.caller_region is None
    assert call.caller_carrier is None
    assert call.called_at is None
    assert call.callee == "+74951234567"


def test_enrich_foreign_caller_keeps_its_country() -> None:
    call = _enrich(_roistat_document(caller="380501234567"))
    assert call.caller == "+380501234567"
    assert call.caller_region == "Украина"


def test_enrich_result_serializes_to_json() -> None:
    call = _enrich(_roistat_document(status="ANSWER", duration=12))
    dumped = call.model_dump(mode="json")
    assert dumped["called_at"] == "2024-03-10T11:30:00Z"
    assert dumped["outcome"] == "answered"
