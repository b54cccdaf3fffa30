"""Configuration errors name the environment variable to fix and never print its value."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from infra.settings import Settings, configuration_errors, env_variable


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


@pytest.mark.parametrize(
    ("variable", "url", "message"),
    [
        ("CALLPIPE_AMQP_URL", "notaurl", "it must start with amqp:// or amqps://"),
        ("CALLPIPE_AMQP_URL", "127.0.0.1:5672", "it must start with amqp://"),
        ("CALLPIPE_AMQP_URL", "http://guest:s3cret@rabbit:5672/", "it must start with amqp://"),
        ("CALLPIPE_AMQP_URL", "amqp:guest:s3cret@rabbit", "it must start with amqp://"),
        ("CALLPIPE_AMQP_URL", "amqp://", "has no host"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3cret@/vhost", "has no host"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3cret@:5672/", "has no host"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3cret@rabbit:56x72/", "port"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3cret@rabbit:70000/", "port"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3c/ret@rabbit/", "port"),  # '/' not %2F-encoded
        ("CALLPIPE_AMQP_URL", "amqp://a:s3cret@r1,r2/", "several hosts"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3cret@[::1/", "not a valid URL"),
        ("CALLPIPE_DATABASE_URL", "notaurl", "it must start with postgresql:// or postgres://"),
        ("CALLPIPE_DATABASE_URL", "host=db password=s3cret", "it must start with postgresql://"),
        ("CALLPIPE_DATABASE_URL", "mysql://u:s3cret@db/x", "it must start with postgresql://"),
        ("CALLPIPE_DATABASE_URL", "postgresql://u:s3cret@db:5432x/x", "port"),
        ("CALLPIPE_DATABASE_URL", "postgresql://u:s3cret@db1:5432,db2:x/x", "port"),
    ],
)
def test_a_malformed_url_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str, message: str
) -> None:
    [line] = errors_for(monkeypatch, **{variable: url})
    assert line.startswith(f"{variable}: ")
    assert message in line
    assert "s3cret" not in line


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("amqp_url", "amqp://guest:guest@127.0.0.1:5672/"),
        ("amqp_url", "amqp://rabbitmq"),
        ("amqp_url", "AMQPS://u:p%2Fw@broker.example:5671/%2F?heartbeat=30"),
        ("amqp_url", "amqp://u:p@[::1]:5672/vh?reconnect_interval=0.5"),
        ("amqp_url", "amqp://u:p@ss@rabbit/"),  # the last @ ends the credentials, as in aio-pika
        ("amqp_url", "amqp://guest:guest@no-such-host.invalid/"),  # unreachable: waited for
        ("database_url", "postgresql://postgres@127.0.0.1:5432/postgres"),
        ("database_url", "postgres://u:p@db/callpipe?sslmode=require"),
        ("database_url", "postgresql:///callpipe"),  # the local socket
        ("database_url", "postgresql://u:p@db1:5432,db2:5433/x?target_session_attrs=read-write"),
        ("database_url", "postgresql://u:p@[::1]:5432/x"),
    ],
)
def test_a_well_formed_url_is_accepted(field: str, url: str) -> None:
    assert getattr(Settings(**{field: url}), field) == url  # type: ignore[arg-type]
