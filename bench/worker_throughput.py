"""Worker throughput: `callpipe worker end` draining a preloaded queue, next to a FastStream peer.

N call-end webhooks (~1 KB Roistat bodies, unique call ids, the callers drawn from a pool of
`--callers` numbers, N by default, so ~37% of the calls come from a number that called
before) are published to `{ns}.webhooks` exactly as the ingress publishes them (persistent,
confirmed, its headers and message id). Once `{ns}.call-end` holds all N, the consumers
start and the clock runs until the last message is done:

- `faststream peer`: what a user would write instead, a FastStream `RabbitBroker` with one
  subscriber on the same queue (same prefetch as callpipe's default) and one asyncpg
  `INSERT ... ON CONFLICT DO NOTHING` per message; done = N rows in `peer_calls`.
- `callpipe` with 1, 2, 4 ... `worker end` processes (enrichment, dedupe, merge, repeat-caller
  count, event published and confirmed); done = N `call_events` rows with `published_at`.

Each variant runs on a fresh namespace (`callpipe setup`), removed at the end. CPU figures
come from /proc: the consumer processes', PostgreSQL's and RabbitMQ's (whole servers, so
anything else on the machine counts too).

    .venv/bin/python bench/worker_throughput.py [--messages 20000] [--processes 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import uvloop
from aio_pika.abc import AbstractConnection
from benchlib import (
    BENCH_PROJECT,
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    LOCALHOST,
    Payloads,
    Subprocesses,
    broker_version,
    callpipe_env,
    cancel_on_sigterm,
    encode,
    machine_line,
    new_namespace,
    print_table,
    queue_depth,
    remove_namespace,
    require_local,
)
from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from infra.runner import run
from infra.settings import Settings
from schemas.topology import (
    HEADER_KIND,
    HEADER_PROJECT,
    HEADER_RECEIVED_AT,
    HEADER_REMOTE_ADDR,
    ROUTING_KEY_BY_KIND,
    Topology,
    event_id,
)

PEER = "faststream peer"
POLL_INTERVAL_S = 0.05
PUBLISH_WINDOW = 256
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
DEFAULT_PREFETCH: int = Settings.model_fields["prefetch"].default

# --- the FastStream peer (runs in a child: this script with --serve-peer) -------------------


def peer_app(
    namespace: str, amqp_url: str, database_url: str, prefetch: int, level: int
) -> FastStream:
    """FastStream logs two lines per message at INFO; above INFO, none (logger=None)."""
    channel = Channel(prefetch_count=prefetch)
    if level <= logging.INFO:
        broker = RabbitBroker(amqp_url, default_channel=channel, log_level=level)
    else:
        broker = RabbitBroker(amqp_url, default_channel=channel, logger=None)
    app = FastStream(broker)
    pools: list[asyncpg.Pool] = []
    insert = (
        f'INSERT INTO "{namespace}".peer_calls (call_id, body) VALUES ($1, $2)'
        " ON CONFLICT DO NOTHING"
    )

    @app.on_startup
    async def open_pool() -> None:
        pools.append(await asyncpg.create_pool(database_url))

    @app.after_shutdown
    async def close_pool() -> None:
        await pools[0].close()

    # declare=False: a passive declare, so the queue callpipe declared is used as it is.
    @broker.subscriber(RabbitQueue(Topology(namespace).call_queue("end"), declare=False))
    async def store(call: dict[str, Any], message: RabbitMessage) -> None:
        # FastStream has already parsed the body (orjson, content type application/json).
        await pools[0].execute(insert, str(call["id"]), message.body.decode())

    return app


def serve_peer(args: argparse.Namespace) -> int:
    level = logging.getLevelNamesMapping()[args.log_level or "WARNING"]
    app = peer_app(args.namespace, args.amqp_url, args.database_url, args.prefetch, level)
    uvloop.run(app.run())  # its own start and stop lines at INFO
    return 0


# --- CPU time from /proc -------------------------------------------------------------------


def read_stat(pid: int) -> tuple[str, float] | None:
    """(command name, user + system CPU seconds) of a live process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


SERVERS = {"postgres": "postgres", "beam.smp": "rabbitmq"}  # command name: server


def servers_cpu() -> dict[str, dict[int, float]]:
    """CPU seconds of every PostgreSQL and RabbitMQ process on this machine, by pid."""
    found: dict[str, dict[int, float]] = {"postgres": {}, "rabbitmq": {}}
    for pid in (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()):
        if (stat := read_stat(pid)) is not None and stat[0] in SERVERS:
            found[SERVERS[stat[0]]][pid] = stat[1]
    return found


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used in between by processes alive at the end (a backend that exited is missed)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


class Children(Subprocesses):
    """benchlib's subprocesses, plus the CPU time of the running ones."""

    def cpu_s(self, names: Sequence[str]) -> float:
        total = 0.0
        for name in names:
            stat = read_stat(self._procs[name].pid)
            total += stat[1] if stat else 0.0
        return total


# --- one variant ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One variant's run; times from the start of its consumer processes."""

    variant: str
    processes: int
    messages: int
    seconds: float  # until the last message was done
    first: tuple[float, float, int]  # at the first seen done: (seconds, consumers' CPU, done)
    cpu_s: float  # the consumers' CPU, start-up included
    postgres_s: float  # all PostgreSQL processes' CPU meanwhile
    rabbitmq_s: float  # RabbitMQ's (beam.smp) CPU meanwhile
    log_lines: int
    log_problems: int

    @property
    def per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def steady_per_s(self) -> float:  # from the first message seen done to the last
        return (self.messages - self.first[2]) / max(self.seconds - self.first[0], 1e-9)

    @property
    def steady_cpu_us(self) -> float:  # the consumers' CPU per message, over the same span
        return (self.cpu_s - self.first[1]) * 1e6 / max(self.messages - self.first[2], 1)

    @property
    def cpu_bound_per_s(self) -> float:
        """The rate at which this CPU per message (the consumers' in steady state, and the
        servers') would keep every core of the machine busy: more is not possible here."""
        servers_us = (self.postgres_s + self.rabbitmq_s) * 1e6 / self.messages
        return CPUS * 1e6 / max(self.steady_cpu_us + servers_us, 1e-9)


def build_messages(count: int, seed: int, callers: int) -> tuple[list[tuple[str, bytes]], float]:
    """(event id, body) of `count` call ends, as the ingress would have accepted them, and the
    share of calls from a number that called before.

    benchlib's bodies, with the caller drawn from a pool of `callers` numbers (benchlib's own
    pool is 200: with 20000 calls nearly every call would be a repeat caller's)."""
    payloads = Payloads(seed)
    rng = random.Random(seed)
    pool = [f"7999{number:07d}" for number in rng.sample(range(10**7), callers)]
    messages, seen = [], set()
    for index in range(count):
        start = payloads.start(index)
        start["caller"] = rng.choice(pool)
        seen.add(start["caller"])
        end = encode(payloads.end(start))
        messages.append((event_id(BENCH_PROJECT, payloads.call_id(index), "end"), end))
    return messages, 1 - len(seen) / count


async def preload(
    connection: AbstractConnection, topology: Topology, messages: Sequence[tuple[str, bytes]]
) -> None:
    """Publish like the ingress (persistent, confirmed, pipelined); wait until all are queued."""
    async with connection.channel(publisher_confirms=True) as channel:
        exchange = await channel.get_exchange(topology.webhooks_exchange, ensure=False)
        for first in range(0, len(messages), PUBLISH_WINDOW):
            batch = []
            for message_id, body in messages[first : first + PUBLISH_WINDOW]:
                message = aio_pika.Message(
                    body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_type="application/json",
                    message_id=message_id,
                    headers={
                        HEADER_PROJECT: BENCH_PROJECT,
                        HEADER_KIND: "end",
                        HEADER_RECEIVED_AT: datetime.now(UTC).isoformat(),
                        HEADER_REMOTE_ADDR: LOCALHOST,
                    },
                )
                batch.append(exchange.publish(message, ROUTING_KEY_BY_KIND["end"], mandatory=True))
            await asyncio.gather(*batch)
    deadline = time.monotonic() + 30
    while (await queue_depth(connection, topology.call_queue("end")))[0] < len(messages):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{topology.call_queue('end')} did not reach {len(messages)}")
        await asyncio.sleep(0.1)


def read_logs(procs: Subprocesses, names: Sequence[str]) -> tuple[int, int]:
    """(lines, WARNING/ERROR/traceback lines) of the consumers' logs; a few problems printed."""
    lines = 0
    problems = []
    for name in names:
        path = procs.log_dir / f"{name}.log"
        for line in path.read_text(errors="replace").splitlines():
            lines += 1
            if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
                problems.append(f"{name}: {line}")
    for line in problems[:5]:
        print(f"    log: {line[:300]}")
    return lines, len(problems)


async def drain(
    conn: asyncpg.Connection,
    connection: AbstractConnection,
    topology: Topology,
    done_rows: str,
    procs: Children,
    names: Sequence[str],
    count: int,
    timeout_s: float,
) -> tuple[tuple[float, float, int], float]:
    """Wait until `count` rows are done: ((time, consumers' CPU, rows) at the first, end time).

    The polls are cheap, not to load PostgreSQL (a count over the wide `call_events` rows
    every 50 ms took a sizeable share of its CPU): is there one row yet; then is anything
    ready in the queue; only once nothing is, the count of rows done."""
    deadline = time.monotonic() + timeout_s
    first_row: tuple[float, float, int] | None = None
    while True:
        await asyncio.sleep(POLL_INTERVAL_S)
        procs.check_alive()
        if time.monotonic() > deadline:
            procs.failed = True
            raise RuntimeError(f"not done after {timeout_s:g} s ({done_rows})")
        if first_row is None:
            if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {done_rows})"):
                rows = await conn.fetchval(f"SELECT count(*) FROM {done_rows}")
                first_row = (time.perf_counter(), procs.cpu_s(names), rows)
        elif (await queue_depth(connection, topology.call_queue("end")))[0] == 0 and (
            await conn.fetchval(f"SELECT count(*) FROM {done_rows}") >= count
        ):
            return first_row, time.perf_counter()


async def run_variant(
    args: argparse.Namespace,
    procs: Children,
    connection: AbstractConnection,
    messages: Sequence[tuple[str, bytes]],
    variant: str,
    processes: int,
    tag: str,
) -> Result:
    namespace = new_namespace()
    topology = Topology(namespace)
    extra = {"metrics_port": "0"}
    if args.prefetch is not None:
        extra["prefetch"] = str(args.prefetch)
    if args.log_level is not None:
        extra["log_level"] = args.log_level
    env = callpipe_env(namespace, args.amqp_url, args.database_url, **extra)
    table = f'"{namespace}".peer_calls' if variant == PEER else f'"{namespace}".call_events'
    done_rows = table if variant == PEER else f"{table} WHERE published_at IS NOT NULL"
    names = [f"{tag}-{i + 1}" for i in range(processes)]
    conn = await asyncpg.connect(args.database_url)
    try:
        setup = [sys.executable, "-m", "callpipe", "setup"]
        await procs.run_to_end(f"{tag}-setup", setup, env, timeout_s=60)
        if variant == PEER:
            await conn.execute(f"CREATE TABLE {table} (call_id text PRIMARY KEY, body jsonb)")
            argv = [sys.executable, __file__, "--serve-peer", "--namespace", namespace]
            argv += ["--prefetch", str(args.prefetch or DEFAULT_PREFETCH)]
            argv += ["--amqp-url", args.amqp_url, "--database-url", args.database_url]
            argv += ["--log-level", args.log_level] if args.log_level else []
        else:
            argv = [sys.executable, "-m", "callpipe", "worker", "end"]
        print(f"  {variant} x{processes}: preloading {len(messages)} call ends ...", flush=True)
        await preload(connection, topology, messages)

        servers_before = servers_cpu()
        started = time.perf_counter()
        for name in names:
            procs.start(name, argv, env)
        first_row, now = await drain(
            conn, connection, topology, done_rows, procs, names, len(messages), args.timeout
        )
        cpu_s = procs.cpu_s(names)
        servers_after = servers_cpu()
        for name in names:
            procs.stop(name)

        left, _ = await queue_depth(connection, topology.call_queue("end"))
        dead, _ = await queue_depth(connection, topology.dead_queue)
        problems = [f"{left} left in the queue"] if left else []
        problems += [f"{dead} in {topology.dead_queue}"] if dead else []
        if variant != PEER:
            calls = await conn.fetchval(f'SELECT count(*) FROM "{namespace}".calls')
            problems += [f"{calls} calls rows"] if calls != len(messages) else []
        if problems:
            procs.failed = True
            raise RuntimeError(f"{variant} x{processes}: {', '.join(problems)}")
        seconds = now - started
        print(f"    {seconds:.2f} s, {len(messages) / seconds:.0f} msgs/s", flush=True)
        log_lines, log_problems = read_logs(procs, names)
        return Result(
            variant=variant,
            processes=processes,
            messages=len(messages),
            seconds=seconds,
            first=(first_row[0] - started, first_row[1], first_row[2]),
            cpu_s=cpu_s,
            postgres_s=cpu_since(servers_before["postgres"], servers_after["postgres"]),
            rabbitmq_s=cpu_since(servers_before["rabbitmq"], servers_after["rabbitmq"]),
            log_lines=log_lines,
            log_problems=log_problems,
        )
    finally:
        for name in names:
            procs.stop(name)
        await conn.close()
        await remove_namespace(args.amqp_url, namespace, database_url=args.database_url)


# --- report --------------------------------------------------------------------------------


COLUMNS: list[tuple[str, Callable[[Result], float], str]] = [
    ("seconds", lambda one: one.seconds, "{:.2f}"),
    ("msgs/s", lambda one: one.per_s, "{:.0f}"),
    ("1st done s", lambda one: one.first[0], "{:.2f}"),
    ("steady/s", lambda one: one.steady_per_s, "{:.0f}"),
    ("CPU µs/msg", lambda one: one.cpu_s * 1e6 / one.messages, "{:.0f}"),
    ("steady CPU µs/msg", lambda one: one.steady_cpu_us, "{:.0f}"),
    ("PG µs/msg", lambda one: one.postgres_s * 1e6 / one.messages, "{:.0f}"),
    ("RMQ µs/msg", lambda one: one.rabbitmq_s * 1e6 / one.messages, "{:.0f}"),
    ("CPU bound/s", lambda one: one.cpu_bound_per_s, "{:.0f}"),
    ("log lines/msg", lambda one: one.log_lines / one.messages, "{:.1f}"),
]


def report(results: Sequence[Result], rounds: int) -> None:
    peer_rates = [one.per_s for one in results if one.variant == PEER]
    peer_rate = statistics.median(peer_rates) if peer_rates else None
    rows = []
    for variant, processes in dict.fromkeys((one.variant, one.processes) for one in results):
        same = [one for one in results if (one.variant, one.processes) == (variant, processes)]
        rate = statistics.median(one.per_s for one in same)
        row = [variant, str(processes), str(same[0].messages)]
        row += [form.format(statistics.median(map(get, same))) for _, get, form in COLUMNS]
        row.insert(5, "-" if peer_rate is None else f"{rate / peer_rate:.2f}")
        if rounds > 1:
            row.insert(5, f"{min(o.per_s for o in same):.0f}..{max(o.per_s for o in same):.0f}")
        rows.append([*row, str(sum(one.log_problems for one in same))])
    headers = ["variant", "procs", "N", *(header for header, _, _ in COLUMNS), "warn+err"]
    headers.insert(5, "vs peer")
    if rounds > 1:
        headers.insert(5, "range")
    print()
    print(f"medians of {rounds} rounds" if rounds > 1 else "one round")
    print_table(headers, rows)
    print(
        f"CPU bound/s: {CPUS} cores / (steady CPU + PG + RMQ per message), the rate at which"
        " that cost would keep the whole machine busy"
    )


# --- the run -------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, procs: Children) -> int:
    cancel_on_sigterm()
    connection = await aio_pika.connect(args.amqp_url)
    try:
        prefetch = args.prefetch or DEFAULT_PREFETCH
        print("worker throughput: consumers draining a preloaded {ns}.call-end")
        print(f"  N = {args.messages} call ends per variant, {args.rounds} round(s), interleaved")
        peer_level = args.log_level or "WARNING (no line per message)"
        print(f"  {PEER}: 1 process, prefetch {prefetch}, log level {peer_level}")
        counts = ", ".join(map(str, args.processes))
        print(f"  callpipe worker end: {counts} processes, prefetch {prefetch},")
        print(f"    log level {args.log_level or 'its default'}, no metrics port")
        print(f"  done polled every {POLL_INTERVAL_S * 1000:.0f} ms; timeout {args.timeout:g} s")
        print(f"  RabbitMQ {await broker_version(connection)}; {machine_line()}")
        callers = args.callers or args.messages
        messages, repeats = build_messages(args.messages, args.seed, callers)
        sizes = sorted(len(body) for _, body in messages)
        print(f"  bodies: median {sizes[len(sizes) // 2]} bytes; callers: {callers} numbers,")
        print(f"    so {repeats:.0%} of the calls come from a number that called before")
        variants = [(PEER, 1)] + [("callpipe", count) for count in args.processes]
        results = []
        for round_, (variant, processes) in itertools.product(range(args.rounds), variants):
            tag = f"r{round_ + 1}-{variant.split()[-1]}-x{processes}"
            one = await run_variant(args, procs, connection, messages, variant, processes, tag)
            results.append(one)
        report(results, args.rounds)
        return 0
    finally:
        procs.stop_all()
        await connection.close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000, help="per variant (20000)")
    parser.add_argument(
        "--processes", default="1,2,4", help="callpipe `worker end` processes per row (1,2,4)"
    )
    parser.add_argument(
        "--callers", type=int, help="numbers the callers are drawn from (default: --messages)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved; medians if > 1")
    parser.add_argument(
        "--prefetch", type=int, help=f"of both (default: callpipe's, {DEFAULT_PREFETCH})"
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="of both (default: callpipe's own, INFO; the peer's WARNING: no line per message)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per variant")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.processes = [int(part) for part in args.processes.split(",") if part.strip()]
    except ValueError:
        parser.error("--processes must be a list of numbers such as 1,2,4")
    limits = [("--messages", args.messages, 100_000), ("--rounds", args.rounds, 9)]
    limits += [("--callers", args.callers or 1, 10**6), ("--prefetch", args.prefetch or 1, 10**4)]
    limits += [("--processes", count, 16) for count in args.processes]
    for flag, value, most in limits:
        if not 1 <= value <= most:
            parser.error(f"{flag} must be within 1..{most}")
    if args.serve_peer and not args.namespace:
        parser.error("--serve-peer needs --namespace")
    require_local(args.amqp_url, "--amqp-url")
    require_local(args.database_url, "--database-url")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.serve_peer:
        return serve_peer(args)
    procs = Children()
    try:
        return run(bench(args, procs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        procs.failed = True
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a check failed: a message missing, left or dead-lettered
        procs.failed = True
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except Exception:
        procs.failed = True
        raise
    finally:
        procs.stop_all()
        if args.keep_logs:
            print(f"subprocess logs kept in {procs.log_dir}")
        else:
            procs.remove_logs()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
