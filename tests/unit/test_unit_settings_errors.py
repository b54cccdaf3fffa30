"""Configuration errors name the environment variable to fix and never print its value."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from callpipe.settings import Settings, configuration_errors, env_variable


@pytest.fixture(autouse=True)
def _no_callpipe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CALLPIPE_"):
            monkeypatch.delenv(name)


def errors_for(monkeypatch: pytest.MonkeyPatch, **variables: str) -> list[str]:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return configuration_errors(caught.value)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CALLPIPE_TOKENS", "shop", "token entry #1 must look like project:token"),
        ("CALLPIPE_HTTP_PORT", "80a", "Input should be a valid integer"),
        ("CALLPIPE_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("CALLPIPE_PREFETCH", "0", "greater than or equal to 1"),
        ("CALLPIPE_LOG_LEVEL", "verbose", "log level must be one of"),
        ("CALLPIPE_NAMESPACE", "Bad-NS", "must be 1-48 characters"),
        ("CALLPIPE_PUBLISH_TIMEOUT_S", "soon", "Input should be a valid number"),
    ],
)
def test_the_error_names_the_variable_that_was_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    [line] = errors_for(monkeypatch, **{variable: value})
    assert line.startswith(f"{variable}: ")
    assert message in line
    assert "Value error" not in line  # pydantic's prefix says nothing to an operator


def test_a_secret_value_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = errors_for(monkeypatch, CALLPIPE_TOKENS="shop:s3cret-one,blog:s3cret-one")
    assert lines == ["CALLPIPE_TOKENS: a token is given twice (projects 'shop', 'blog')"]


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_has_its_variable(field: str) -> None:
    assert env_variable(field) == f"CALLPIPE_{field.upper()}"


def test_every_variable_named_is_the_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value set under the named variable reaches the field (pydantic-settings reads it)."""
    monkeypatch.setenv(env_variable("http_port"), "8181")
    monkeypatch.setenv(env_variable("namespace"), "from_env")
    settings = Settings()
    assert (settings.http_port, settings.namespace) == (8181, "from_env")
