"""Configuration: token lists and the validation of settings."""

from __future__ import annotations

import os
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from infra.settings import Settings, parse_tokens


@pytest.fixture(autouse=True)
def _no_callpipe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CALLPIPE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", {}),
        ("  ", {}),
        ("shop:abc123", {"abc123": "shop"}),
        ("shop:abc,blog:def", {"abc": "shop", "def": "blog"}),
        (" shop : abc , blog:def ", {"abc": "shop", "def": "blog"}),
        ("shop:abc,,blog:def,", {"abc": "shop", "def": "blog"}),
        ("shop:a,shop:b", {"a": "shop", "b": "shop"}),
        ("shop:tok:en", {"tok:en": "shop"}),
        ("магазин:токен", {"токен": "магазин"}),
    ],
)
def test_parse_tokens(spec: str, expected: dict[str, str]) -> None:
    assert parse_tokens(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shop", "#1 must look like project:token"),
        ("shop:", "#1"),
        (":abc", "#1"),
        (" : ", "#1"),
        ("shop:abc,blog", "#2"),
        ("shop:abc,blog:", "#2"),
        ("shop:abc,blog:abc", "given twice"),
        ("x" * 65 + ":abc", "longer than 64 bytes"),
    ],
)
def test_parse_tokens_names_the_bad_entry(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tokens(spec)


def test_duplicate_token_error_does_not_leak_the_token() -> None:
    with pytest.raises(ValueError) as caught:
        parse_tokens("shop:s3cret,blog:s3cret")
    assert "s3cret" not in str(caught.value)
    assert "'shop'" in str(caught.value)
    assert "'blog'" in str(caught.value)


def test_a_bad_tokens_setting_does_not_print_the_tokens() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(tokens="shop:s3cret-one,blog")
    assert "s3cret-one" not in str(caught.value)


def test_defaults() -> None:
    settings = Settings()
    assert settings.namespace == "callpipe"
    assert settings.roistat_tz == "Europe/Moscow"
    assert settings.default_region == "RU"
    assert settings.max_body_bytes == 65536
    assert settings.project_by_token == {}
    assert settings.time_zone == ZoneInfo("Europe/Moscow")
    assert settings.topology.webhooks_exchange == "callpipe.webhooks"


def test_explicit_values() -> None:
    settings = Settings(
        namespace="test_ns",
        tokens="shop:abc",
        roistat_tz="Asia/Yekaterinburg",
        default_region="kz",
    )
    assert settings.topology.call_queue("end") == "test_ns.call-end"
    assert settings.project_by_token == {"abc": "shop"}
    assert settings.time_zone == ZoneInfo("Asia/Yekaterinburg")
    assert settings.default_region == "KZ"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLPIPE_NAMESPACE", "from_env")
    monkeypatch.setenv("CALLPIPE_TOKENS", "shop:t1")
    settings = Settings()
    assert settings.namespace == "from_env"
    assert settings.project_by_token == {"t1": "shop"}


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        pytest.param({"namespace": "Bad-NS"}, "namespace", "namespace", id="namespace"),
        pytest.param({"namespace": ""}, "namespace", "namespace", id="empty-namespace"),
        pytest.param({"namespace": "callpipe\n"}, "namespace", "namespace", id="ns-newline"),
        pytest.param({"roistat_tz": "Moscow"}, "roistat_tz", "time zone", id="tz-not-iana"),
        pytest.param({"roistat_tz": "Europe/Mordor"}, "roistat_tz", "time zone", id="tz-unknown"),
        pytest.param({"roistat_tz": ""}, "roistat_tz", "time zone", id="tz-empty"),
        pytest.param({"roistat_tz": "../etc/passwd"}, "roistat_tz", "time zone", id="tz-path"),
        pytest.param({"default_region": "RUS"}, "default_region", "two-letter", id="region-3"),
        pytest.param({"default_region": "R"}, "default_region", "two-letter", id="region-1"),
        pytest.param({"default_region": "7"}, "default_region", "two-letter", id="region-digit"),
        pytest.param({"default_region": "R1"}, "default_region", "two-letter", id="region-mix"),
        pytest.param({"tokens": "shop"}, "tokens", "project:token", id="tokens-malformed"),
        pytest.param({"tokens": "a:t,b:t"}, "tokens", "twice", id="tokens-duplicate"),
        pytest.param({"http_port": 70000}, "http_port", "65535", id="port-too-big"),
        pytest.param({"max_body_bytes": 10}, "max_body_bytes", "1024", id="body-limit-tiny"),
        pytest.param(
            {"max_body_bytes": 8 * 1024 * 1024 + 1},
            "max_body_bytes",
            "8388608",
            id="body-limit-huge",
        ),
        pytest.param({"prefetch": 0}, "prefetch", "1", id="prefetch-zero"),
        pytest.param({"publish_timeout_s": 0}, "publish_timeout_s", "0", id="timeout-zero"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**kwargs)  # type: ignore[arg-type]
    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert message in errors[0]["msg"]


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.namespace = "other"  # type: ignore[misc]
