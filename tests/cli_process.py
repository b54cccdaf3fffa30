"""Run the `callpipe` command as a process, with only the CALLPIPE_* variables a test gives."""

from __future__ import annotations

import asyncio
import os
import sys


def cli_environment(env: dict[str, str]) -> dict[str, str]:
    """The test's own environment without CALLPIPE_* settings, then `env`."""
    inherited = {k: v for k, v in os.environ.items() if not k.upper().startswith("CALLPIPE_")}
    return {**inherited, **env}


async def run_cli(*args: str, env: dict[str, str], deadline_s: float = 30.0) -> tuple[int, str]:
    """Exit code and output (stdout and stderr); fails if the command is still running after
    `deadline_s` (a start-up that should have stopped but waits or retries)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callpipe",
        *args,
        env=cli_environment(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=deadline_s)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        raise AssertionError(
            f"callpipe {' '.join(args)} still running after {deadline_s:g}s:\n{output.decode()}"
        ) from None
    assert process.returncode is not None
    return process.returncode, output.decode()
