"""The `callpipe` command: a thin dispatcher to the ingress, the workers and set-up."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import aiohttp
from pydantic import ValidationError

from callpipe.broker import connect, declare_topology
from callpipe.logs import setup_logging
from callpipe.replay import replay_dead
from callpipe.runner import Component, run, run_until_signalled, serve_ingress
from callpipe.sample import send_sample
from callpipe.settings import Settings
from callpipe.subscriptions import (
    SINK_PREFIX,
    EventFilter,
    SubscriptionError,
    parse_time,
    replay_events,
    subscribe,
)
from schemas.topology import validate_binding_key, validate_endpoint_name
from workers.service import migrate_when_up, run_worker


async def setup(settings: Settings) -> int:
    """Declare the topology and migrate the database, waiting for both to come up. Idempotent."""
    connection = await connect(settings.amqp_url, name="callpipe-setup")
    async with connection:
        await declare_topology(await connection.channel(), settings.topology)
    print(f"topology of namespace {settings.namespace!r} declared")
    applied = await migrate_when_up(settings)
    print(f"database schema {settings.namespace!r}: applied {applied or 'nothing new'}")
    return 0


async def replay(settings: Settings, limit: int) -> int:
    connection = await connect(settings.amqp_url, name="callpipe-replay")
    async with connection:
        report = await replay_dead(
            connection, settings.topology, limit=limit, timeout_s=settings.publish_timeout_s
        )
    print(report.line())
    return 0


async def subscribe_queue(settings: Settings, args: argparse.Namespace) -> int:
    connection = await connect(settings.amqp_url, name="callpipe-subscribe")
    async with connection:
        try:
            report = await subscribe(
                connection, settings.topology, args.name, bind=args.bind, unbind=args.unbind
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


def _add_subscription_commands(
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


def _check_subscription_args(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], args: argparse.Namespace
) -> None:
    if args.command == "subscribe" and not (args.bind or args.unbind):
        commands.choices["subscribe"].error("give at least one --bind KEY (or --unbind KEY)")
    if args.command == "replay-events" and args.since and args.until and args.since >= args.until:
        commands.choices["replay-events"].error("--since must be earlier than --until")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="callpipe", description="Roistat call-tracking webhooks to PostgreSQL and events."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="ingress and both workers in one process (dev, small installs)")
    commands.add_parser("ingress", help="the HTTP ingress")
    worker = commands.add_parser("worker", help="a worker for one queue kind")
    worker.add_argument("kind", choices=["start", "end"])
    commands.add_parser("setup", help="declare the RabbitMQ topology, migrate the database")
    replay = commands.add_parser(
        "replay-dead", help="send the call webhooks in {ns}.dead back to the workers"
    )
    replay.add_argument("--limit", type=int, default=10000, help="at most this many (10000)")
    sample = commands.add_parser("send-sample", help="post sample Roistat calls to an ingress")
    sample.add_argument(
        "--url",
        required=True,
        help="the webhook base URL, e.g. http://127.0.0.1:8080/roistat/TOKEN",
    )
    sample.add_argument("--calls", type=int, default=10, help="how many calls (default 10)")
    sample.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    sample.add_argument(
        "--duplicates", type=float, default=0.1, help="share of calls with a webhook sent twice"
    )
    sample.add_argument(
        "--concurrency", type=int, default=1, help="calls in flight at once (default 1: in order)"
    )
    _add_subscription_commands(commands)
    args = parser.parse_args(argv)
    _check_subscription_args(commands, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "send-sample":
        setup_logging()
        try:
            report = asyncio.run(
                send_sample(
                    args.url,
                    args.calls,
                    seed=args.seed,
                    duplicate_ratio=args.duplicates,
                    concurrency=args.concurrency,
                )
            )
        except aiohttp.ClientError as exc:
            print(f"callpipe: cannot post to {args.url}: {exc}", file=sys.stderr)
            return 1
        print("\n".join(report.lines()))
        return 0 if set(report.statuses) <= {"200"} else 1
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"callpipe: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if args.command == "setup":
        return asyncio.run(setup(settings))
    if args.command == "replay-dead":
        return asyncio.run(replay(settings, args.limit))
    if args.command == "subscribe":
        return asyncio.run(subscribe_queue(settings, args))
    if args.command == "replay-events":
        return asyncio.run(replay_stored_events(settings, args))
    if args.command in ("run", "ingress") and not settings.project_by_token:
        print("callpipe: CALLPIPE_TOKENS is empty: set it to project:token[,...]", file=sys.stderr)
        return 2
    components: list[Component] = []
    if args.command in ("run", "ingress"):
        components.append(partial(serve_ingress, settings))
    if args.command == "run":
        components += [partial(run_worker, settings, "start"), partial(run_worker, settings, "end")]
    if args.command == "worker":
        components.append(partial(run_worker, settings, args.kind))
    return run(run_until_signalled(components))


if __name__ == "__main__":
    sys.exit(main())
