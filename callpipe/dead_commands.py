"""`callpipe dead ...`, `callpipe rejected ...` and `replay-dead`, and the kept queues' part
of `setup`."""

from __future__ import annotations

import argparse
import sys
from typing import cast

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from callpipe.dead_letters import describe
from callpipe.dead_operations import (
    KeptQueue,
    Which,
    find_letters,
    list_letters,
    purge_letters,
    requeue_letters,
)
from callpipe.letters import ID_LENGTH, now_utc, parse_duration
from callpipe.queue_scan import QueueNotFoundError
from callpipe.replay import replay_dead
from infra.broker import connect, probe_declare
from infra.kept_queues import bounds_of, kept_queue_arguments, policy_command, vhost_of
from infra.settings import Settings

SHOWN_KEPT = 100  # lines about messages left in place, before "... and N more"
COLUMNS = ("ID", "AGE", "{source}", "CALL", "PHONES", "REASON")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _letter_id(text: str) -> str:
    value = text.strip().lower()
    if len(value) != ID_LENGTH or any(char not in "0123456789abcdef" for char in value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an id: {ID_LENGTH} hex digits, as `list` shows them"
        )
    return value


def add_dead_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    helps = {
        "dead": "inspect, requeue or purge the dead letters in {ns}.dead",
        "rejected": "inspect, requeue (re-validated) or purge the bodies in {ns}.rejected",
    }
    for which, text in helps.items():
        group = commands.add_parser(which, help=text, description=text)
        actions = group.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list", help="one line per message; phones masked")
        listing.add_argument(
            "--limit", type=int, default=200, help="print at most this many lines (0: all)"
        )
        show = actions.add_parser("show", help="headers and body of one message")
        show.add_argument("id", type=_letter_id, help="an id from `list`")
        show.add_argument("--unmasked", action="store_true", help="print phone numbers as-is")
        requeue_help = "send back to the workers" + (
            ", or to the sink or subscription that gave up"
            if which == "dead"
            else " the bodies the ingress would accept today"
        )
        requeue = actions.add_parser("requeue", help=requeue_help, description=requeue_help)
        requeue.add_argument(
            "ids", nargs="*", type=_letter_id, metavar="ID", help="ids from `list`"
        )
        requeue.add_argument("--all", action="store_true", help="every message")
        purge = actions.add_parser(
            "purge", help="remove messages for good", description="remove messages for good"
        )
        purge.add_argument("ids", nargs="*", type=_letter_id, metavar="ID", help="ids from `list`")
        purge.add_argument(
            "--older-than",
            type=_duration,
            metavar="DURATION",
            help="only those older than this, e.g. 7d, 12h, 30m, 1d12h",
        )
    replay = commands.add_parser(
        "replay-dead", help="the same as `dead requeue --all` (kept for existing scripts)"
    )
    replay.add_argument("--limit", type=int, default=10000, help="at most this many (10000)")


def check_dead_args(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], args: argparse.Namespace
) -> None:
    if args.command not in ("dead", "rejected"):
        return
    group = commands.choices[args.command]
    if args.action == "requeue" and bool(args.ids) == bool(args.all):
        group.error("requeue: give the ids to requeue, or --all (not both)")
    if args.action == "purge" and not args.ids and args.older_than is None:
        group.error("purge: give the ids to remove, or --older-than DURATION, or both")


async def run_dead_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "replay-dead":
        which: Which = "dead"
        action = "requeue"
    else:
        which = cast(Which, args.command)
        action = args.action
    kept = KeptQueue(which, settings.topology)
    connection = await connect(settings.amqp_url, name=f"callpipe-{which}-{action}")
    async with connection:
        timeout_s = settings.publish_timeout_s
        try:
            if action == "list":
                return await _list(connection, kept, args.limit, timeout_s)
            if action == "show":
                return await _show(connection, kept, args.id, args.unmasked, timeout_s)
            if args.command == "replay-dead":
                return await _replay(connection, kept, args.limit, timeout_s)
            if action == "requeue":
                ids = None if args.all else set(args.ids)
                return await _requeue(connection, kept, ids, timeout_s)
            return await _purge(connection, kept, set(args.ids) or None, args, timeout_s)
        except QueueNotFoundError as exc:
            print(
                f"callpipe: {exc}: is CALLPIPE_NAMESPACE={settings.namespace} right? "
                "(`callpipe setup` declares it)",
                file=sys.stderr,
            )
            return 2


async def _list(
    connection: AbstractRobustConnection, kept: KeptQueue, limit: int, timeout_s: float
) -> int:
    listing = await list_letters(connection, kept, timeout_s=timeout_s)
    rows = listing.rows if limit <= 0 else listing.rows[:limit]
    source = "SOURCE" if kept.which == "dead" else "PROJECT"
    table = [[column.format(source=source) for column in COLUMNS]]
    table += [[r.id, r.age, r.source, r.call_id, r.phones, r.reason] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
    more = len(listing.rows) - len(rows)
    suffix = f" ({more} not printed: --limit 0 prints all)" if more else ""
    print(f"{len(listing.rows)} {kept.noun} in {kept.queue}{suffix}")
    return 0


async def _show(
    connection: AbstractRobustConnection,
    kept: KeptQueue,
    letter_id: str,
    unmasked: bool,
    timeout_s: float,
) -> int:
    found = await find_letters(connection, kept, letter_id, timeout_s=timeout_s)
    if not found:
        print(f"callpipe: no message with id {letter_id} in {kept.queue}", file=sys.stderr)
        return 1
    letter = found[0]
    source, reason = kept.source_and_reason(letter)
    print("\n".join(describe(letter, source, reason, now_utc(), unmasked=unmasked)))
    if len(found) > 1:
        print(f"({len(found)} exact copies of it are in {kept.queue})")
    return 0


async def _requeue(
    connection: AbstractRobustConnection, kept: KeptQueue, ids: set[str] | None, timeout_s: float
) -> int:
    outcome = await requeue_letters(connection, kept, ids, timeout_s=timeout_s)
    for letter_id in outcome.requeued if ids is not None else []:
        print(f"requeued {letter_id}")
    _print_limited([f"kept {letter_id}: {why}" for letter_id, why in outcome.kept])
    for letter_id, why in outcome.failed:
        print(f"failed {letter_id} (it stays): {why}", file=sys.stderr)
    for letter_id in outcome.missing:
        print(f"callpipe: no message with id {letter_id} in {kept.queue}", file=sys.stderr)
    print(
        f"requeued {len(outcome.requeued)} of {outcome.read} {kept.noun}; "
        f"kept {len(outcome.kept)}; failed {len(outcome.failed)}"
    )
    stuck = outcome.failed or outcome.missing or (ids is not None and outcome.kept)
    return 1 if stuck else 0


async def _replay(
    connection: AbstractRobustConnection, kept: KeptQueue, limit: int, timeout_s: float
) -> int:
    report = await replay_dead(connection, kept.topology, limit=limit, timeout_s=timeout_s)
    print(report.line())
    return 0


async def _purge(
    connection: AbstractRobustConnection,
    kept: KeptQueue,
    ids: set[str] | None,
    args: argparse.Namespace,
    timeout_s: float,
) -> int:
    outcome = await purge_letters(connection, kept, ids, args.older_than, timeout_s=timeout_s)
    for letter_id in outcome.missing:
        print(f"callpipe: no message with id {letter_id} in {kept.queue}", file=sys.stderr)
    undated = f"; {outcome.undated} of unknown age kept" if outcome.undated else ""
    print(f"purged {len(outcome.purged)} of {outcome.read} {kept.noun}{undated}")
    return 1 if outcome.missing else 0


def _print_limited(lines: list[str]) -> None:
    for line in lines[:SHOWN_KEPT]:
        print(line)
    if len(lines) > SHOWN_KEPT:
        print(f"... and {len(lines) - SHOWN_KEPT} more")


async def kept_queue_lines(channel: AbstractChannel, settings: Settings) -> list[str]:
    """For `setup`: each kept queue's bound, or the policy that bounds one declared before."""
    topology = settings.topology
    bounds = bounds_of(settings)
    lines = []
    for queue in (topology.dead_queue, topology.rejected_queue):
        bound = bounds.for_queue(topology, queue)
        mismatch = await probe_declare(channel, queue, kept_queue_arguments(bound))
        if mismatch is None:
            lines.append(f"queue {queue!r} bounded: {bound.describe()}")
        else:
            lines += [
                f"queue {queue!r} was declared before it had a bound ({mismatch}).",
                "  Unless a policy bounds it already, bound it with (README, Dead letters):",
                "  " + policy_command(queue, bound, vhost_of(settings.amqp_url)),
            ]
            if queue == topology.rejected_queue:
                lines.append(
                    f"  What overflows then goes to {topology.dead_queue} (the old queue's "
                    "dead-letter target); recreating the queue avoids that (README)."
                )
    return lines
