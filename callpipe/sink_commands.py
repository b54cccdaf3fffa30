"""The `callpipe sinks` command, and the sinks part of `setup` and `run`."""

from __future__ import annotations

import argparse
import base64
import os
import sys
from functools import partial

from aio_pika.abc import AbstractChannel

from infra.runner import Component
from infra.settings import Settings
from sinks.config import SinkConfig, SinksFileError
from sinks.port import Done, GiveUp
from sinks.registry import load_sinks
from sinks.service import run_sinks, try_sink
from sinks.topology import declare_sink


class SinkCommandError(Exception):
    """A sinks file or a sink name that cannot be used; exit code 2."""


def add_sinks_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sinks = commands.add_parser(
        "sinks", help="deliver events to the sinks of CALLPIPE_SINKS_FILE (webhooks, Telegram)"
    )
    sinks.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run this sink (repeatable)"
    )
    sinks.add_argument(
        "--test", metavar="NAME", help="send one sample missed call to NAME's destination, now"
    )
    sinks.add_argument(
        "--new-secret", action="store_true", help="print a new Standard Webhooks secret"
    )


def configured_sinks(settings: Settings, only: list[str] | None = None) -> list[SinkConfig]:
    """The sinks of the sinks file, or only the named ones; `SinkCommandError` says why not."""
    try:
        configs = load_sinks(settings.sinks_file)
    except SinksFileError as exc:
        raise SinkCommandError(str(exc)) from exc
    if not only:
        return configs
    known = {config.name: config for config in configs}
    for name in only:
        if name not in known:
            where = settings.sinks_file or "CALLPIPE_SINKS_FILE (not set)"
            raise SinkCommandError(
                f"no sink named {name!r} in {where} (known: {', '.join(known) or 'none'})"
            )
    return [known[name] for name in only]


async def declare_sinks(channel: AbstractChannel, settings: Settings) -> list[str]:
    """Declare every configured sink's queues; a line for each, for `setup` to print."""
    lines = []
    for config in configured_sinks(settings):
        await declare_sink(channel, settings.topology, config)
        keys = ", ".join(config.binding_keys)
        lines.append(f"sink queue {settings.topology.sink_queue(config.name)!r} bound to {keys}")
    return lines


def sinks_component(settings: Settings, only: list[str] | None = None) -> Component:
    return partial(run_sinks, settings, configured_sinks(settings, only))


async def test_destination(settings: Settings, name: str) -> int:
    (config,) = configured_sinks(settings, [name])
    result = await try_sink(settings, config)
    if isinstance(result, Done):
        print(f"sink {name!r}: delivered a sample missed call")
        return 0
    verdict = "refused (final)" if isinstance(result, GiveUp) else "failed (would be retried)"
    print(f"sink {name!r}: {verdict}: {result.reason}", file=sys.stderr)
    return 1


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()
