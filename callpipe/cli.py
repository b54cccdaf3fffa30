"""The `callpipe` command: a thin dispatcher to the ingress, the workers and set-up.

Each process imports the components it runs, in `dispatch`, before the runner freezes what
start-up loaded (`infra.runner.run`): an ingress does not load the workers' phone data
(~120 MB), nor a worker the ingress app.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from functools import partial

import aiohttp
from pydantic import ValidationError

from callpipe.dead_commands import (
    add_dead_commands,
    check_dead_args,
    kept_queue_lines,
    run_dead_command,
)
from callpipe.sample import send_sample
from callpipe.sink_commands import (
    SinkCommandError,
    add_sinks_command,
    configured_sinks,
    declare_sinks,
    new_secret,
    sinks_component,
    test_destination,
)
from callpipe.subscription_commands import (
    add_subscription_commands,
    check_subscription_args,
    replay_stored_events,
    subscribe_queue,
)
from infra.broker import connect, declare_topology
from infra.kept_queues import bounds_of
from infra.logs import setup_logging
from infra.runner import Component, run, run_until_signalled
from infra.settings import Settings, configuration_errors
from workers.migrate import migrate_when_up


async def setup(settings: Settings) -> int:
    """Declare the topology and migrate the database, waiting for both to come up. Idempotent."""
    connection = await connect(settings.amqp_url, name="callpipe-setup")
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, settings.topology, bounds_of(settings))
        print(f"topology of namespace {settings.namespace!r} declared")
        for line in await kept_queue_lines(channel, settings):
            print(line)
        for line in await declare_sinks(channel, settings):
            print(line)
    applied = await migrate_when_up(settings)
    print(f"database schema {settings.namespace!r}: applied {applied or 'nothing new'}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="callpipe", description="Roistat call-tracking webhooks to PostgreSQL and events."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run", help="ingress, both workers and the sinks in one process (dev, small installs)"
    )
    commands.add_parser("ingress", help="the HTTP ingress")
    worker = commands.add_parser("worker", help="a worker for one queue kind")
    worker.add_argument("kind", choices=["start", "end"])
    commands.add_parser("setup", help="declare the RabbitMQ topology, migrate the database")
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
    add_subscription_commands(commands)
    add_sinks_command(commands)
    add_dead_commands(commands)
    args = parser.parse_args(argv)
    check_subscription_args(commands, args)
    check_dead_args(commands, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "sinks" and args.new_secret:
        print(new_secret())
        return 0
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
        # Each line names the variable to fix; values are left out (URLs and tokens are secrets).
        lines = (f"  {line}" for line in configuration_errors(exc))
        print("callpipe: bad configuration:", *lines, sep="\n", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return dispatch(args, settings)
    except SinkCommandError as exc:
        print(f"callpipe: {exc}", file=sys.stderr)
        return 2


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in ("setup", "run", "sinks"):
        configured_sinks(settings)  # a bad sinks file stops here, before any connection
    if args.command == "setup":
        return asyncio.run(setup(settings))
    if args.command in ("dead", "rejected", "replay-dead"):
        return asyncio.run(run_dead_command(settings, args))
    if args.command == "subscribe":
        return asyncio.run(subscribe_queue(settings, args))
    if args.command == "replay-events":
        return asyncio.run(replay_stored_events(settings, args))
    if args.command == "sinks" and args.test:
        return asyncio.run(test_destination(settings, args.test))
    if args.command in ("run", "ingress") and not settings.project_by_token:
        print("callpipe: CALLPIPE_TOKENS is empty: set it to project:token[,...]", file=sys.stderr)
        return 2
    components: list[Component] = []
    if args.command in ("run", "ingress"):
        from ingress.serve import serve_ingress

        components.append(partial(serve_ingress, settings))
    if args.command in ("run", "worker"):
        from workers.health import WorkerMonitor, serve_worker_endpoints
        from workers.service import run_worker

        # One server for the process: `run` serves both kinds' metrics and readiness on it.
        monitor = WorkerMonitor()
        if settings.metrics_port:
            components.append(partial(serve_worker_endpoints, settings, monitor))
    if args.command == "run":
        components += [
            partial(run_worker, settings, "start", monitor=monitor),
            partial(run_worker, settings, "end", monitor=monitor),
        ]
        if configured_sinks(settings):
            components.append(sinks_component(settings))
    if args.command == "worker":
        components.append(partial(run_worker, settings, args.kind, monitor=monitor))
    if args.command == "sinks":
        components.append(sinks_component(settings, args.only))
    return run(run_until_signalled(components))


if __name__ == "__main__":
    sys.exit(main())
