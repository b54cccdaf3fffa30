"""The `callpipe subscribe` and `callpipe replay-events` commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from callpipe.subscriptions import (
    SINK_PREFIX,
    EventFilter,
    SubscriptionError,
    parse_time,
    replay_events,
    subscribe,
)
from infra.broker import connect
from infra.kept_queues import bounds_of
from infra.settings import Settings
from schemas.topology import validate_binding_key, validate_endpoint_name


async def subscribe_queue(settings: Settings, args: argparse.Namespace) -> int:
    connection = await connect(settings.amqp_url, name="callpipe-subscribe")
    async with connection:
        try:
            report = await subscribe(
                connection,
                settings.topology,
                args.name,
                bind=args.bind,
                unbind=args.unbind,
                bounds=bounds_of(settings),
            )
        except SubscriptionError as exc:
            print(f"callpipe: {exc}", file=sys.stderr)
            return 1
    print("\n".join(report.lines()))
    return 0


async def replay_stored_events(settings: Settings, args: argparse.Namespace) -> int:
    wanted = EventFilter(args.since, args.until, args.project, tuple(args.bind))
    connection = await connect(settings.amqp_url, name="callpipe-replay-events")
    async with connection:
        try:
            report = await replay_events(
                connection,
                settings.database_url,
                settings.topology,
                args.to,
                wanted,
                timeout_s=settings.publish_timeout_s,
            )
        except SubscriptionError as exc:
            print(f"callpipe: {exc}", file=sys.stderr)
            return 1
    print(report.line())
    return 0


T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` that reports a validator's ValueError as it is worded."""

    def check(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def _replay_target(text: str) -> str:
    validate_endpoint_name(text.removeprefix(SINK_PREFIX))
    return text


def add_subscription_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    sub = commands.add_parser(
        "subscribe", help="declare the queue {ns}.sub.NAME, bound to {ns}.events (idempotent)"
    )
    sub.add_argument("name", type=_argument(validate_endpoint_name), help="[a-z][a-z0-9_-]{0,31}")
    sub.add_argument(
        "--bind",
        action="append",
        default=[],
        type=_argument(validate_binding_key),
        metavar="KEY",
        help="binding key on {ns}.events, e.g. 'call.ended.*' or 'call.#' (repeatable)",
    )
    sub.add_argument(
        "--unbind",
        action="append",
        default=[],
        type=_argument(validate_binding_key),
        metavar="KEY",
        help="remove a binding made earlier (repeatable)",
    )
    replay = commands.add_parser(
        "replay-events", help="publish stored events again, straight to one queue"
    )
    replay.add_argument(
        "--to",
        required=True,
        type=_argument(_replay_target),
        metavar="NAME",
        help="a subscription NAME ({ns}.sub.NAME) or sink.NAME ({ns}.sink.NAME)",
    )
    replay.add_argument(
        "--since",
        type=_argument(parse_time),
        metavar="T",
        help="received at or after T (ISO 8601; UTC unless an offset is given)",
    )
    replay.add_argument(
        "--until", type=_argument(parse_time), metavar="T", help="received before T"
    )
    replay.add_argument("--project", help="only this project")
    replay.add_argument(
        "--bind",
        action="append",
        default=[],
        type=_argument(validate_binding_key),
        metavar="KEY",
        help="only events whose routing key this binding key matches (repeatable)",
    )


def check_subscription_args(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], args: argparse.Namespace
) -> None:
    if args.command == "subscribe" and not (args.bind or args.unbind):
        commands.choices["subscribe"].error("give at least one --bind KEY (or --unbind KEY)")
    if args.command == "replay-events" and args.since and args.until and args.since >= args.until:
        commands.choices["replay-events"].error("--since must be earlier than --until")
