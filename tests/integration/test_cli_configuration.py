"""Configuration errors of the `callpipe` command, as an operator sees them: the variable to
fix, never its value, exit code 2, no traceback."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import pytest
from cli_process import cli_environment, run_cli
from conftest import Services, free_port

from infra.settings import Settings


def fresh_namespace() -> str:
    return f"cpt_{uuid.uuid4().hex[:12]}"


async def test_a_malformed_setting_names_its_variable_not_the_field() -> None:
    code, output = await run_cli(
        "ingress",
        env={
            "CALLPIPE_NAMESPACE": fresh_namespace(),
            "CALLPIPE_TOKENS": "shop:s3cret-token,broken",
            "CALLPIPE_HTTP_PORT": "eighty",
        },
    )
    assert code == 2, output
    lines = output.splitlines()
    assert lines == [
        "callpipe: bad configuration:",
        "  CALLPIPE_TOKENS: token entry #2 must look like project:token",
        "  CALLPIPE_HTTP_PORT: Input should be a valid integer,"
        " unable to parse string as an integer",
    ]
    assert "s3cret-token" not in output
    assert "eighty" not in output


async def test_every_bad_setting_is_reported_by_its_variable() -> None:
    code, output = await run_cli(
        "worker",
        "end",
        env={
            "CALLPIPE_NAMESPACE": "Bad-Name",
            "CALLPIPE_PREFETCH": "0",
            "CALLPIPE_ROISTAT_TZ": "Europe/Mordor",
        },
    )
    assert code == 2, output
    named = sorted(line.split(":")[0].strip() for line in output.splitlines()[1:])
    assert named == ["CALLPIPE_NAMESPACE", "CALLPIPE_PREFETCH", "CALLPIPE_ROISTAT_TZ"]
    assert "Traceback" not in output
    assert "errors.pydantic.dev" not in output


@pytest.mark.parametrize(
    ("variable", "url", "message"),
    [
        ("CALLPIPE_AMQP_URL", "notaurl", "it must start with amqp:// or amqps://"),
        ("CALLPIPE_AMQP_URL", "http://guest:s3cret@127.0.0.1:5672/", "it must start with amqp://"),
        ("CALLPIPE_AMQP_URL", "amqp://guest:s3cret@/", "has no host"),
        ("CALLPIPE_DATABASE_URL", "notaurl", "it must start with postgresql://"),
        ("CALLPIPE_DATABASE_URL", "postgresql://u:s3cret@127.0.0.1:54x32/x", "port"),
    ],
)
@pytest.mark.parametrize("command", [["setup"], ["worker", "end"], ["run"]])
async def test_a_malformed_service_url_stops_the_start_with_exit_2(
    services: Services, command: list[str], variable: str, url: str, message: str
) -> None:
    """Before any connection: retrying a URL that can never work would wait forever."""
    env = {
        "CALLPIPE_AMQP_URL": services.amqp_url,
        "CALLPIPE_DATABASE_URL": services.database_url,
        "CALLPIPE_NAMESPACE": fresh_namespace(),
        "CALLPIPE_TOKENS": "shop:tok",
        variable: url,
    }
    code, output = await run_cli(*command, env=env, deadline_s=20)
    assert code == 2, output
    assert output.splitlines()[0] == "callpipe: bad configuration:"
    [line] = output.splitlines()[1:]
    assert line.startswith(f"  {variable}: ")
    assert message in line
    assert "s3cret" not in output


@pytest.mark.parametrize("unreachable", ["database", "broker"])
async def test_an_unreachable_service_is_still_waited_for(
    services: Services, settings: Settings, unreachable: str
) -> None:
    """A well-formed URL whose service does not answer (yet) is retried until SIGTERM."""
    closed = free_port()
    env = {
        "CALLPIPE_AMQP_URL": services.amqp_url,
        "CALLPIPE_DATABASE_URL": services.database_url,
        "CALLPIPE_NAMESPACE": settings.namespace,
    }
    if unreachable == "database":
        env["CALLPIPE_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{closed}/postgres"
        retrying = "database migration failed"
    else:
        env["CALLPIPE_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{closed}/"
        retrying = "connecting to the broker as callpipe-worker-end failed"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        "worker",
        "end",
        env=cli_environment(env),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        for _ in range(2):  # a second retry: it keeps waiting, it has not given up
            line = await asyncio.wait_for(process.stderr.readline(), timeout=15)
            while retrying not in line.decode():
                assert line, "the worker exited instead of waiting"
                line = await asyncio.wait_for(process.stderr.readline(), timeout=15)
        assert process.returncode is None
        # The retry was just logged: the worker now waits out its backoff, and stops at once.
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
