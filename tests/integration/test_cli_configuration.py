"""Configuration errors of the `callpipe` command, as an operator sees them: the variable to
fix, never its value, exit code 2, no traceback."""

from __future__ import annotations

import uuid

from cli_process import run_cli


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
