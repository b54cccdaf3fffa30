"""Reading Roistat webhook bodies: what is refused, and how leniently the rest is read."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas import codec
from schemas.roistat import (
    MAX_NESTING,
    CallEndPayload,
    CallStartPayload,
    InvalidWebhookError,
    call_id_of,
    detect_kind,
    parse_webhook,
    read_webhook,
)
from schemas.topology import Kind


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"id": "call-1", **fields})


def _nested(depth: int) -> bytes:
    """`depth` nested JSON arrays."""
    return b"[" * depth + b"]" * depth


# --- read_webhook: refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"", "not_json", id="empty"),
        pytest.param(b" \r\n\t", "not_json", id="whitespace-only"),
        pytest.param(b"{", "not_json", id="truncated"),
        pytest.param(b"id=123&status=ANSWER", "not_json", id="form-encoded"),
        pytest.param(b'{"id": "a"} trailing', "not_json", id="trailing-garbage"),
        pytest.param(b"{'id': 'a'}", "not_json", id="single-quotes"),
        pytest.param(b'{"id": NaN}', "not_json", id="nan"),
        pytest.param(b'{"id": 1e400}', "not_json", id="infinite-number"),
        pytest.param(b"\xff\xfe{}", "not_utf8", id="utf16-bom"),
        pytest.param('{"id": "Иван"}'.encode("cp1251"), "not_utf8", id="cp1251-cyrillic"),
        pytest.param(b'{"id": "\xed\xa0\x80"}', "not_utf8", id="lone-surrogate"),
        pytest.param(b"[" * 5000, "too_deep", id="5000-open-brackets"),
        pytest.param(_nested(1025), "too_deep", id="1025-levels"),
        pytest.param(b'{"id": "a", "x": ' + _nested(300) + b"}", "too_deep", id="deep-field"),
        pytest.param(b"[]", "not_object", id="array"),
        pytest.param(b'[{"id": "a"}]', "not_object", id="array-of-objects"),
        pytest.param(b'"{\\"id\\": \\"a\\"}"', "not_object", id="string"),
        pytest.param(b"42", "not_object", id="number"),
        pytest.param(b"null", "not_object", id="null"),
        pytest.param(b"true", "not_object", id="boolean"),
        pytest.param(b"{}", "missing_id", id="no-id"),
        pytest.param(b'{"caller": "79990009911"}', "missing_id", id="no-id-other-fields"),
        pytest.param(b'{"id": ""}', "missing_id", id="empty-id"),
        pytest.param(b'{"id": "   "}', "missing_id", id="whitespace-id"),
        pytest.param(b'{"id": "\\u00a0\\t"}', "missing_id", id="unicode-whitespace-id"),
        pytest.param(b'{"id": true}', "missing_id", id="true-id"),
        pytest.param(b'{"id": false}', "missing_id", id="false-id"),
        pytest.param(b'{"id": null}', "missing_id", id="null-id"),
        pytest.param(b'{"id": {"value": 1}}', "missing_id", id="object-id"),
        pytest.param(b'{"id": [1]}', "missing_id", id="array-id"),
        pytest.param(b'{"ID": "a"}', "missing_id", id="wrong-case-key"),
        pytest.param(b'{"id": "' + b"9" * 129 + b'"}', "id_too_long", id="id-too-long"),
        pytest.param(
            ('{"id": "%s"}' % ("я" * 65)).encode(), "id_too_long", id="id-too-long-in-bytes"
        ),
    ],
)
def test_read_webhook_refuses_with_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidWebhookError) as caught:
        read_webhook(body)
    assert caught.value.reason == reason
    assert caught.value.message
    assert str(caught.value) == caught.value.message


def test_read_webhook_ignores_a_utf8_byte_order_mark() -> None:
    assert read_webhook(b'\xef\xbb\xbf{"id": "7", "city": "\xd0\x9c"}') == {"id": "7", "city": "М"}


def test_longest_call_id_is_accepted() -> None:
    assert read_webhook(b'{"id": "' + b"9" * 128 + b'"}')["id"] == "9" * 128


def test_custom_fields_as_a_string_nested_too_deep_is_missing_not_an_error() -> None:
    deep = "[" * 300 + "]" * 300
    assert (
        parse_webhook(orjson.dumps({"id": "1", "custom_fields": deep}), "end").payload.custom_fields
        is None
    )


def test_parse_webhook_replaces_nul_that_postgresql_cannot_store() -> None:
    webhook = parse_webhook(b'{"id": "1", "city": "a\\u0000b", "k\\u0000": ["\\u0000"]}', "end")
    assert webhook.payload.city == "a\ufffdb"
    assert webhook.document == {"id": "1", "city": "a\ufffdb", "k\ufffd": ["\ufffd"]}
    assert orjson.loads(webhook.document_json) == webhook.document  # not the body: it has NULs


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 7, "city": "\\u041c"}',
        b'\xef\xbb\xbf{\n  "id": "7",\n  "custom_fields": {"a": [1, 2.5]}\n}\n',
    ],
)
def test_document_json_is_the_body_as_received_less_a_byte_order_mark(body: bytes) -> None:
    webhook = parse_webhook(body, "end")
    assert webhook.document_json == body.removeprefix(b"\xef\xbb\xbf")
    assert orjson.loads(webhook.document_json) == webhook.document


def test_read_webhook_names_the_json_type_it_got() -> None:
    with pytest.raises(InvalidWebhookError, match="array"):
        read_webhook(b"[1, 2]")


def test_read_webhook_says_an_empty_body_is_empty() -> None:
    with pytest.raises(InvalidWebhookError, match="empty"):
        read_webhook(b"")


# --- read_webhook: accepted ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"id": 123}', {"id": 123}, id="int-id"),
        pytest.param(b'{"id": 0}', {"id": 0}, id="zero-id"),
        pytest.param(b'{"id": "abc"}', {"id": "abc"}, id="string-id"),
        pytest.param(b'{"id": " abc "}', {"id": " abc "}, id="padded-id-kept-as-received"),
        pytest.param(b'{"id": 12.0}', {"id": 12.0}, id="float-id"),
        pytest.param(
            '{"id": "звонок-1", "city": "Москва"}'.encode(),
            {"id": "звонок-1", "city": "Москва"},
            id="cyrillic",
        ),
        pytest.param(b'  {"id": "a"}\n', {"id": "a"}, id="surrounding-whitespace"),
        pytest.param(
            b'{"id": "a", "x": ' + _nested(50) + b"}",
            {"id": "a", "x": orjson.loads(_nested(50))},
            id="moderately-nested",
        ),
    ],
)
def test_read_webhook_returns_the_object_unchanged(body: bytes, expected: dict[str, Any]) -> None:
    assert read_webhook(body) == expected


@pytest.mark.parametrize("depth", [1, 10, 100, 200, 252, 253, 254, 300, 1000, 1024])
def test_every_accepted_document_can_be_encoded_again_inside_an_envelope(depth: int) -> None:
    """What the ingress accepts, the worker must be able to store and publish (raw in an event)."""
    body = b'{"id": "a", "caller": ' + _nested(depth) + b"}"
    try:
        document = read_webhook(body)
    except InvalidWebhookError as exc:
        assert exc.reason == "too_deep"
        return
    parse_webhook(body, "start")
    assert codec.loads(codec.dumps({"event": {"raw": document}})) == {"event": {"raw": document}}


def test_nesting_limit_is_exact() -> None:
    at_limit = b'{"id": "a", "x": ' + _nested(MAX_NESTING - 1) + b"}"
    assert read_webhook(at_limit)["id"] == "a"
    with pytest.raises(InvalidWebhookError) as caught:
        read_webhook(b'{"id": "a", "x": ' + _nested(MAX_NESTING) + b"}")
    assert caught.value.reason == "too_deep"
    assert str(MAX_NESTING) in caught.value.message


# --- call_id_of ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (123, "123"),
        (0, "0"),
        (-7, "-7"),
        (2**63, str(2**63)),
        (12.0, "12"),
        (12.5, "12.5"),
        ("abc", "abc"),
        ("  abc\n", "abc"),
        ("0", "0"),
        ("звонок", "звонок"),
        ("", None),
        ("  ", None),
        (None, None),
        (True, None),
        (False, None),
        (float("nan"), None),
        (float("inf"), None),
        ([1], None),
        ({"id": 1}, None),
    ],
)
def test_call_id_of(value: Any, expected: str | None) -> None:
    assert call_id_of(value) == expected


# --- detect_kind ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "kind"),
    [
        pytest.param({"id": "a"}, "start", id="no-result-fields"),
        pytest.param({"id": "a", "status": None, "duration": None}, "start", id="nulls"),
        pytest.param({"id": "a", "status": "", "duration": ""}, "start", id="empty-strings"),
        pytest.param({"id": "a", "status": "  ", "duration": " "}, "start", id="blank-strings"),
        pytest.param({"id": "a", "caller": "79990009911"}, "start", id="start-fields"),
        pytest.param({"id": "a", "status": "ANSWER"}, "end", id="status"),
        pytest.param({"id": "a", "status": "SOMETHING_NEW"}, "end", id="unknown-status"),
        pytest.param({"id": "a", "duration": 35}, "end", id="duration"),
        pytest.param({"id": "a", "duration": 0}, "end", id="zero-duration"),
        pytest.param({"id": "a", "duration": "35"}, "end", id="duration-as-string"),
        pytest.param({"id": "a", "status": "", "duration": "12"}, "end", id="empty-status"),
        pytest.param({"id": "a", "status": None, "duration": 3}, "end", id="null-status"),
    ],
)
def test_detect_kind(document: dict[str, Any], kind: Kind) -> None:
    assert detect_kind(document) == kind


# --- parse_webhook and the lenient field types --------------------------------------------


@pytest.mark.parametrize("kind", ["start", "end"])
def test_parse_webhook_keeps_kind_and_document(kind: Kind) -> None:
    body = _body(caller="79990009911", status="ANSWER")
    webhook = parse_webhook(body, kind)
    assert webhook.kind == kind
    assert webhook.document == orjson.loads(body)
    assert webhook.payload.id == "call-1"
    # Both kinds share one model: a start carrying end fields keeps them.
    assert webhook.payload.status == "ANSWER"


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"", "not_json"), (b"[]", "not_object"), (b"{}", "missing_id")],
)
def test_parse_webhook_refuses_what_read_webhook_refuses(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidWebhookError) as caught:
        parse_webhook(body, "end")
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("raw_id", "expected"),
    [(123, "123"), ("  abc ", "abc"), ("звонок-7", "звонок-7"), (12.0, "12"), (0, "0")],
)
def test_payload_id_is_text(raw_id: Any, expected: str) -> None:
    assert parse_webhook(orjson.dumps({"id": raw_id}), "start").payload.id == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("79990009911", "79990009911", id="string"),
        pytest.param(79990009911, "79990009911", id="number-as-int"),
        pytest.param(79990009911.0, "79990009911", id="number-as-whole-float"),
        pytest.param(1.5, "1.5", id="fraction"),
        pytest.param("  12345 ", "12345", id="padded"),
        pytest.param("", None, id="empty-string"),
        pytest.param("   ", None, id="whitespace"),
        pytest.param(None, None, id="null"),
        pytest.param(True, "true", id="true"),
        pytest.param(False, "false", id="false"),
        pytest.param(0, "0", id="zero"),
        pytest.param("Москва", "Москва", id="cyrillic"),
        pytest.param({"a": 1}, '{"a":1}', id="object-as-json"),
        pytest.param([1, "два"], '[1,"два"]', id="array-as-json"),
    ],
)
def test_text_fields_accept_any_scalar(value: Any, expected: str | None) -> None:
    fields = ("caller", "order_id", "visit_id", "city", "utm_source", "status", "link")
    payload = parse_webhook(_body(**dict.fromkeys(fields, value)), "end").payload
    for field in fields:
        assert getattr(payload, field) == expected, field


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(35, 35, id="int"),
        pytest.param(0, 0, id="zero"),
        pytest.param(35.0, 35, id="whole-float"),
        pytest.param(35.4, 35, id="fraction-rounds-down"),
        pytest.param(35.6, 36, id="fraction-rounds-up"),
        pytest.param(34.5, 35, id="half-rounds-up"),
        pytest.param(7 * 24 * 3600 + 1, None, id="longer-than-a-week"),
        pytest.param("1e12", None, id="too-large-for-postgresql"),
        pytest.param("35", 35, id="string"),
        pytest.param(" 35.0 ", 35, id="padded-float-string"),
        pytest.param("35,0", 35, id="decimal-comma"),
        pytest.param("", None, id="empty-string"),
        pytest.param("abc", None, id="garbage"),
        pytest.param("35 сек", None, id="with-unit"),
        pytest.param(None, None, id="null"),
        pytest.param(True, None, id="bool"),
        pytest.param(-5, None, id="negative"),
        pytest.param("-5", None, id="negative-string"),
        pytest.param("nan", None, id="nan-string"),
        pytest.param("inf", None, id="inf-string"),
        pytest.param("1e400", None, id="overflowing-string"),
        pytest.param([35], None, id="array"),
        pytest.param({"s": 35}, None, id="object"),
    ],
)
def test_duration_is_a_whole_number_of_seconds(value: Any, expected: int | None) -> None:
    assert parse_webhook(_body(duration=value), "end").payload.duration == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param([{"name": "Менеджер", "value": "Иван"}], None, id="list"),
        pytest.param({"manager": "Иван", "budget": 1000}, None, id="object"),
        pytest.param('{"manager": "Иван"}', {"manager": "Иван"}, id="object-as-json-string"),
        pytest.param('[{"name": "a"}]', [{"name": "a"}], id="list-as-json-string"),
        pytest.param([], "missing", id="empty-list"),
        pytest.param({}, "missing", id="empty-object"),
        pytest.param("", "missing", id="empty-string"),
        pytest.param("[]", "missing", id="empty-list-as-string"),
        pytest.param("{}", "missing", id="empty-object-as-string"),
        pytest.param("not json", "missing", id="garbage-string"),
        pytest.param('"nested"', "missing", id="json-string-of-string"),
        pytest.param("5", "missing", id="json-number-string"),
        pytest.param(5, "missing", id="number"),
        pytest.param(True, "missing", id="bool"),
        pytest.param(None, "missing", id="null"),
    ],
)
def test_custom_fields_is_a_list_or_an_object(value: Any, expected: Any) -> None:
    payload = parse_webhook(_body(custom_fields=value), "start").payload
    if expected == "missing":
        assert payload.custom_fields is None
    else:
        assert payload.custom_fields == (value if expected is None else expected)


def test_custom_fields_keeps_its_field_order_and_cyrillic_keys() -> None:
    value = {"Источник": "Яндекс", "Бюджет": "1000", "a": None}
    payload = parse_webhook(_body(custom_fields=value), "start").payload
    assert isinstance(payload.custom_fields, dict)
    assert list(payload.custom_fields.items()) == list(value.items())


def test_unknown_fields_are_kept_verbatim_in_model_extra() -> None:
    extra: dict[str, Any] = {
        "new_roistat_field": "значение",
        "nested": {"a": [1, 2, {"b": None}]},
        "number": 1.5,
        "empty": "",
        "null": None,
        "_underscored": 1,
        "model_config": "not ours",
    }
    payload = parse_webhook(_body(**extra), "start").payload
    assert payload.model_extra == extra


def test_known_fields_are_not_in_model_extra() -> None:
    payload = parse_webhook(_body(caller="7999", status="BUSY", duration="3"), "end").payload
    assert payload.model_extra == {}


def test_unknown_status_is_kept_verbatim() -> None:
    payload = parse_webhook(_body(status="VOICEMAIL_NEW"), "end").payload
    assert payload.status == "VOICEMAIL_NEW"


def test_lower_case_status_is_kept_as_received() -> None:
    assert parse_webhook(_body(status="answer"), "end").payload.status == "answer"


def test_payload_models_are_frozen() -> None:
    payload = parse_webhook(_body(), "start").payload
    with pytest.raises(ValueError, match="frozen"):
        payload.caller = "1"  # type: ignore[misc]


def test_call_start_model_has_no_end_fields() -> None:
    end_only = {"status", "file_id", "duration", "link"}
    assert end_only.isdisjoint(CallStartPayload.model_fields)
    assert end_only <= set(CallEndPayload.model_fields)


def test_a_realistic_call_end_loses_nothing() -> None:
    document: dict[str, Any] = {
        "id": "2891473",
        "caller": "79990009911",
        "callee": "74951234567",
        "visit_id": 615123,
        "marker": "yandex_direct_smm",
        "order_id": "",
        "date": "2024-03-10 14:30:00",
        "google_client_id": "1284823445.1710000000",
        "metrika_client_id": 1710000000123456789,
        "custom_fields": '{"manager": "Иван"}',
        "landing_page": "https://example.ru/каталог?utm_source=yandex",
        "domain": "example.ru",
        "city": "Москва",
        "country": "Россия",
        "ip": "95.31.0.1",
        "first_visit": None,
        "referrer": "https://yandex.ru/",
        "utm_source": "yandex",
        "utm_medium": "cpc",
        "utm_campaign": "весна-2024",
        "utm_term": "",
        "utm_content": None,
        "roistat_param_1": "",
        "source_level_1": "Яндекс.Директ",
        "source_level_2": "Кампания 1",
        "status": "ANSWER",
        "file_id": 98765,
        "duration": "125",
        "link": "https://cloud.roistat.com/call/98765.mp3",
        "manager_id": 17,
    }
    webhook = parse_webhook(orjson.dumps(document), "end")
    payload = webhook.payload
    assert webhook.document == document
    assert payload.id == "2891473"
    assert payload.visit_id == "615123"
    assert payload.order_id is None
    assert payload.metrika_client_id == "1710000000123456789"
    assert payload.custom_fields == {"manager": "Иван"}
    assert payload.utm_campaign == "весна-2024"
    assert payload.utm_term is None
    assert payload.source_level_1 == "Яндекс.Директ"
    assert payload.file_id == "98765"
    assert payload.duration == 125
    assert payload.model_extra == {"manager_id": 17}
