"""End to end: paced webhooks through ingress and both workers to a row and a confirmed event.

For each rate R (webhooks/s) in `--rates`, on a fresh namespace: `callpipe setup`, then
`callpipe ingress`, `callpipe worker start` and `callpipe worker end` as subprocesses. The script
posts calls in an open loop for `--duration` seconds: every webhook has its own slot, R per second,
and is sent at that slot whatever the earlier answers (a call's end follows its start by
`--end-delay`). Latency per webhook = its `call_events.published_at` (the broker confirmed its
event; the worker writes it after the row is committed) minus the wall clock just before its
POST, matched by event id `{project}:{call_id}:{kind}`. CPU of every process, as % of one core,
over the load window from /proc/<pid>/stat. Issue 7's target: 1000 webhooks/s for 60 s, p99 within
250 ms. Exit 1 on any non-200, missing row or event, or message in `{ns}.dead` / `{ns}.rejected`.

    .venv/bin/python bench/end_to_end.py --rates 200,400 --duration 30
    .venv/bin/python bench/end_to_end.py --search --rates 250 --search-step 250
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractConnection
from benchlib import (
    BENCH_PROJECT,
    BENCH_TOKEN,
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    LOCALHOST,
    Payloads,
    Spread,
    Subprocesses,
    broker_version,
    callpipe_env,
    cancel_on_sigterm,
    encode,
    fmt_ms,
    free_port,
    machine_line,
    new_namespace,
    print_table,
    queue_depth,
    remove_namespace,
    require_local,
    run_bench,
    wait_http_ok,
)
from http_load import LeanHttpClient, post_request

from schemas.topology import Topology

WARMUP_CALLS = 20
MAX_WEBHOOKS = 200_000  # per rate: payloads are built in memory before the window
GEN_MIN_PCT = 97.0  # the generator kept at least this share of its schedule ...
GEN_MAX_LATE_P99_MS = 50.0  # ... and its sends were this late at most (p99), else "behind"
CPU_GROUPS = ("ingress", "worker start", "worker end", "pg backends", "rabbitmq", "generator")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
BACKENDS = "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1) AND client_addr = $2"


# --- CPU from /proc ------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...); empty if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses


def child_pg_ports(pids: Sequence[int], pg_port: int) -> list[int]:
    """Local ports of these processes' TCP connections to PostgreSQL, from /proc."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    inodes.add(os.readlink(fd).removeprefix("socket:[").removesuffix("]"))
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, inode = (line.split()[i] for i in (1, 2, 9))
        if inode in inodes and remote.endswith(f":{pg_port:04X}"):
            ports.append(int(local.partition(":")[2], 16))
    return ports


def local_pids() -> dict[str, list[int]]:
    """Our three callpipe children (by command line and parent), RabbitMQ's beam.smp, us."""
    groups: dict[str, list[int]] = {name: [] for name in CPU_GROUPS}
    groups["generator"].append(os.getpid())
    for entry in Path("/proc").iterdir():
        try:
            pid, comm = int(entry.name), (entry / "comm").read_text().strip()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (ValueError, OSError):
            continue
        command = " ".join(argv[3:]).strip()  # python -m callpipe <command>
        if comm == "beam.smp":
            groups["rabbitmq"].append(pid)
        elif command in groups and stat_fields(pid)[1:2] == [str(os.getpid())]:
            groups[command].append(pid)  # not another run's `python -m callpipe ingress`
    return groups


async def pids_by_group(pool: asyncpg.Pool, pg_port: int) -> dict[str, list[int]]:
    """`local_pids` and the PostgreSQL backends serving our children's connections."""
    groups = local_pids()
    ports = child_pg_ports([pid for name in CPU_GROUPS[:3] for pid in groups[name]], pg_port)
    rows = await pool.fetch(BACKENDS, ports, LOCALHOST)
    groups["pg backends"] = [row[0] for row in rows]
    return groups


def cpu_ticks(groups: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    """utime + stime of each process, 0 if it is gone."""
    ticks = {name: {pid: stat_fields(pid)[11:13] for pid in pids} for name, pids in groups.items()}
    return {name: {pid: sum(map(int, f)) for pid, f in t.items()} for name, t in ticks.items()}


def cpu_percent(
    before: dict[str, dict[int, int]], after: dict[str, dict[int, int]], seconds: float
) -> dict[str, float]:
    """% of one core per group; a new process counts from 0, one that exited is left out."""
    used = {
        name: sum(max(0, ticks - before[name].get(pid, 0)) for pid, ticks in after[name].items())
        for name in after
    }
    return {name: 100.0 * value / TICKS_PER_S / seconds for name, value in used.items()}


# --- the load ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shot:
    offset_s: float  # slot, from the start of the window
    request: bytes  # the whole HTTP request
    event_id: str


@dataclass(frozen=True, slots=True)
class Sent:
    event_id: str
    sent_at: float  # wall clock just before the POST, comparable with PostgreSQL's clock
    sent_perf: float
    late_s: float  # how long after its slot the POST went out
    status: int | None  # None: no answer (connection error, timeout)
    spooled: bool


def schedule(
    payloads: Payloads, port: int, first: int, calls: int, rate: float, end_delay_s: float
) -> list[Shot]:
    """Starts every 2/R s; each call's end 1/R s after its start plus `end_delay_s` (rounded to
    whole pairs), so a webhook comes every 1/R s: two interleaved streams of R/2."""
    pair_s = 2.0 / rate
    lag_s = 1.0 / rate + round(end_delay_s / pair_s) * pair_s
    shots = []
    for n, index in enumerate(range(first, first + calls)):
        start = payloads.start(index)
        bodies = {"start": (n * pair_s, start), "end": (n * pair_s + lag_s, payloads.end(start))}
        for kind, (offset, body) in bodies.items():
            event_id = f"{BENCH_PROJECT}:{payloads.call_id(index)}:{kind}"
            path = f"/roistat/{BENCH_TOKEN}/call-{kind}"
            request = post_request(LOCALHOST, port, path, encode(body), "application/json")
            shots.append(Shot(offset, request, event_id))
    shots.sort(key=lambda shot: shot.offset_s)
    return shots


async def post(client: LeanHttpClient, shot: Shot, started: float) -> Sent:
    now = time.perf_counter()
    sent_at = time.time()
    status, spooled = None, False
    try:
        status, body = await client.request(shot.request)
        answer = orjson.loads(body)
        spooled = isinstance(answer, dict) and answer.get("spooled") is True
    except (OSError, TimeoutError, ValueError):  # no answer, or one that is not JSON
        pass
    return Sent(shot.event_id, sent_at, now, now - (started + shot.offset_s), status, spooled)


async def drive(client: LeanHttpClient, shots: Sequence[Shot], started: float) -> list[Sent]:
    """Open loop: one task per webhook, created at its slot; answers are never waited for."""
    tasks = []
    for shot in shots:
        # sleep(0) when behind still yields, so the sends already due go out first.
        await asyncio.sleep(max(0.0, started + shot.offset_s - time.perf_counter()))
        tasks.append(asyncio.create_task(post(client, shot, started)))
    return list(await asyncio.gather(*tasks))


# --- one rate ------------------------------------------------------------------------------


@dataclass
class Result:
    """One rate's run; the figures below `sent` are filled in by `summarize`."""

    rate: float
    sent: list[Sent] = field(default_factory=list)
    scheduled_s: float = 0.0  # offset of the last slot
    window_s: float = 0.0  # first slot to the last answer: the CPU window
    cpu: dict[str, float] = field(default_factory=dict)
    queued: int = 0  # still ready in call-start + call-end at the deadline
    dead: int = 0
    rejected: int = 0
    accepted: int = 0
    spooled: int = 0
    missing: int = 0
    gen_pct: float = 100.0  # scheduled span / achieved span of the sends: 100 = on schedule
    late: Spread | None = None
    stored_per_s: float = 0.0
    latency: Spread | None = None
    backlog: int = 0  # accepted but not yet confirmed when the last POST went out
    drain_s: float | None = None

    def summarize(self, published_at: dict[str, float]) -> None:
        ok = [one for one in self.sent if one.status == 200]
        done = [(one, published_at[one.event_id]) for one in ok if one.event_id in published_at]
        self.accepted, self.spooled = len(ok), sum(one.spooled for one in self.sent)
        self.missing = len(ok) - len(done)
        span = max(one.sent_perf for one in self.sent) - min(one.sent_perf for one in self.sent)
        self.gen_pct = 100.0 * self.scheduled_s / span if span > 0 else 100.0
        self.late = Spread.of([one.late_s for one in self.sent])
        self.latency = Spread.of([at - one.sent_at for one, at in done])
        first, last = (f(one.sent_at for one in self.sent) for f in (min, max))
        if done:
            last_done = max(at for _, at in done)
            self.stored_per_s = len(done) / (last_done - first)
            self.drain_s = last_done - last
        self.backlog = self.missing + sum(at > last for _, at in done)

    @property
    def gen_behind(self) -> bool:
        late_p99 = self.late.p99 if self.late else 0.0
        return self.gen_pct < GEN_MIN_PCT or late_p99 > GEN_MAX_LATE_P99_MS

    @property
    def failed(self) -> bool:
        return bool(self.accepted != len(self.sent) or self.missing or self.dead or self.rejected)

    def meets(self, p99_ms: float) -> bool:
        good = not self.failed and not self.gen_behind
        return good and self.latency is not None and self.latency.p99 <= p99_ms


async def wait_for_events(
    pool: asyncpg.Pool, table: str, expected: int, deadline: float, procs: Subprocesses
) -> None:
    """Poll until `expected` events are confirmed or the deadline passes; progress every 5 s."""
    query = f"SELECT count(*) FROM {table} WHERE published_at IS NOT NULL"
    shown = time.monotonic()
    while True:
        found: int = await pool.fetchval(query)
        if found >= expected or time.monotonic() > deadline:
            return
        procs.check_alive()
        if time.monotonic() - shown > 5:
            print(f"    draining: {found}/{expected} events confirmed")
            shown = time.monotonic()
        await asyncio.sleep(0.2)


async def run_rate(
    args: argparse.Namespace, procs: Subprocesses, connection: AbstractConnection, rate: float
) -> Result:
    namespace = new_namespace()
    topology = Topology(namespace)
    spool_dir = tempfile.mkdtemp(prefix="callpipe-bench-spool-")
    port = free_port()
    urls = (namespace, args.amqp_url, args.database_url)
    extra = {"prefetch": str(args.prefetch)} if args.prefetch else {}
    env = callpipe_env(
        *urls, http_port=str(port), spool_dir=spool_dir, log_level=args.log_level, **extra
    )
    env["CALLPIPE_DRAIN_S"] = "0"  # on SIGTERM the ingress stops at once: no load balancer here
    base = f"http://{LOCALHOST}:{port}"
    pg_port = urlsplit(args.database_url).port or 5432
    table = f'"{namespace}".call_events'
    result = Result(rate)
    pool: asyncpg.Pool | None = None
    tag = f"{rate:g}"
    print(f"rate {tag} webhooks/s: namespace {namespace}")
    try:
        await procs.run_to_end(f"setup-{tag}", [sys.executable, "-m", "callpipe", "setup"], env, 60)
        procs.start(f"ingress-{tag}", [sys.executable, "-m", "callpipe", "ingress"], env)
        ready = [f"{base}/readyz"]
        for kind in ("start", "end"):
            metrics_port = free_port()  # /readyz: consuming, and the database answers
            ready.append(f"http://{LOCALHOST}:{metrics_port}/readyz")
            argv = [sys.executable, "-m", "callpipe", "worker", kind]
            procs.start(
                f"worker-{kind}-{tag}", argv, {**env, "CALLPIPE_METRICS_PORT": str(metrics_port)}
            )
        payloads = Payloads(args.seed)
        warmup = schedule(payloads, port, 0, WARMUP_CALLS, 50.0, args.end_delay)
        calls = max(1, round(rate * args.duration / 2))
        shots = schedule(payloads, port, WARMUP_CALLS, calls, rate, args.end_delay)
        result.scheduled_s = shots[-1].offset_s
        for url in ready:
            await wait_http_ok(url, procs, what="callpipe")
        pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
        client = LeanHttpClient(LOCALHOST, port, args.connections, timeout_s=30)
        try:
            # Untimed: connections opened, the workers' first queries and publishes done.
            warm = await drive(client, warmup, time.perf_counter())
            await wait_for_events(pool, table, len(warm), time.monotonic() + 30, procs)
            print(f"    {len(shots)} webhooks over {result.scheduled_s:.1f}s ...")
            before = cpu_ticks(await pids_by_group(pool, pg_port))
            gc.freeze()  # the payloads stay: no full collection walks them (a pause of ~0.1 s)
            started = time.perf_counter()
            result.sent = await drive(client, shots, started)
            result.window_s = time.perf_counter() - started
            gc.unfreeze()
            after = cpu_ticks(await pids_by_group(pool, pg_port))
            result.cpu = cpu_percent(before, after, result.window_s)
        finally:
            client.close()
        deadline = time.monotonic() + args.drain_timeout
        expected = sum(one.status == 200 for one in [*warm, *result.sent])
        await wait_for_events(pool, table, expected, deadline, procs)
        query = f"SELECT event_id, published_at FROM {table} WHERE published_at IS NOT NULL"
        result.summarize({row[0]: row[1].timestamp() for row in await pool.fetch(query)})
        for queue in (topology.call_queue("start"), topology.call_queue("end")):
            result.queued += (await queue_depth(connection, queue))[0]
        result.dead = (await queue_depth(connection, topology.dead_queue))[0]
        result.rejected = (await queue_depth(connection, topology.rejected_queue))[0]
        procs.failed = procs.failed or result.failed
        p99 = fmt_ms(result.latency.p99 if result.latency else None)
        print(f"    p99 {p99} ms, backlog {result.backlog}, missing {result.missing}")
        return result
    finally:
        procs.stop_all()
        if pool is not None:
            await pool.close()
        await remove_namespace(args.amqp_url, namespace, database_url=args.database_url)
        shutil.rmtree(spool_dir, ignore_errors=True)


# --- report --------------------------------------------------------------------------------


def report(results: Sequence[Result], p99_ms: float) -> None:
    print()
    print("throughput and latency, ms: webhook POST -> row committed and event confirmed")
    rows = []
    for r in results:
        spread = r.latency
        cells = [spread.p50, spread.p95, spread.p99, spread.max] if spread else [None] * 4
        rows.append(
            [
                f"{r.rate:g}",
                f"{r.rate * r.gen_pct / 100:.0f}" + (" BEHIND" if r.gen_behind else ""),
                fmt_ms(r.late.p99 if r.late else None),
                f"{100.0 * r.accepted / len(r.sent):.1f}",
                str(r.spooled),
                f"{r.stored_per_s:.0f}",
                *(fmt_ms(value) for value in cells),
                str(r.backlog),
                "-" if r.drain_s is None else f"{r.drain_s:.1f}",
                f"{r.missing} ({r.queued} queued)" if r.missing else "0",
            ]
        )
    headers = ["rate", "sent/s", "late p99", "200 %", "spooled", "stored/s"]
    headers += ["p50", "p95", "p99", "max", "backlog", "drain s", "missing"]
    print_table(headers, rows)
    print()
    print("CPU, % of one core over the load window (rabbitmq: the whole broker, shared)")
    rows = [[f"{r.rate:g}", f"{r.window_s:.1f}"] for r in results]
    for row, r in zip(rows, results, strict=True):
        row += [f"{r.cpu[name]:.0f}" for name in CPU_GROUPS]
    print_table(["rate", "window s", *CPU_GROUPS], rows)
    print()
    for r in results:
        errors = Counter(str(one.status) for one in r.sent if one.status != 200)
        problems = [f"non-200: {dict(errors)}"] if errors else []
        problems += [f"{r.missing} rows/events missing"] if r.missing else []
        problems += [f"dead {r.dead}, rejected {r.rejected}"] if r.dead or r.rejected else []
        if problems:
            print(f"rate {r.rate:g}: FAILED: {'; '.join(problems)}")
    good = [r.rate for r in results if r.meets(p99_ms)]
    best = f"{max(good):g} webhooks/s" if good else "none of the rates run"
    print(f"highest rate with p99 <= {p99_ms:g} ms (no loss, generator on schedule): {best}")


# --- the run -------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, procs: Subprocesses) -> int:
    cancel_on_sigterm()
    connection = await aio_pika.connect(args.amqp_url)
    results: list[Result] = []
    try:
        print("end to end: Roistat POST -> ingress -> RabbitMQ -> workers -> PostgreSQL -> event")
        search = f", then +{args.search_step:g} while p99 <= {args.p99_ms:g} ms" * args.search
        print(f"  rates (webhooks/s): {', '.join(f'{r:g}' for r in args.rates)}{search}")
        print(f"  {args.duration:g}s each, open loop, a call's end {args.end_delay:g}s after start")
        print(f"  client: this process (bench/http_load.py), <= {args.connections} connections")
        print(f"  drain deadline {args.drain_timeout:g}s after the last POST")
        print(f"  log level {args.log_level}; RabbitMQ {await broker_version(connection)}")
        print(f"  {machine_line()}")
        for rate in args.rates:
            results.append(await run_rate(args, procs, connection, rate))
        rate = args.rates[-1] + args.search_step
        while args.search and results[-1].meets(args.p99_ms) and rate <= args.search_max:
            results.append(await run_rate(args, procs, connection, rate))
            rate += args.search_step
        report(results, args.p99_ms)
        return 1 if any(r.failed for r in results) else 0
    finally:
        await connection.close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--rates", default="500,1000", help="webhooks/s, comma-separated (500,1000)")
    add("--duration", type=float, default=60.0, help="seconds of load per rate (60)")
    add("--search", action="store_true", help="then step up while p99 and loss are fine")
    add("--search-step", type=float, default=250.0, help="webhooks/s (250)")
    add("--search-max", type=float, default=3000.0, help="webhooks/s (3000)")
    add("--p99-ms", type=float, default=250.0, help="latency target, ms (250)")
    add("--end-delay", type=float, default=0.1, help="a call's end after its start, s (0.1)")
    add("--connections", type=int, default=256, help="client connection limit (256)")
    add("--prefetch", type=int, help="the workers' (default: callpipe's)")
    add("--drain-timeout", type=float, default=60.0, help="s after the last POST (60)")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    add("--log-level", default="INFO", choices=levels, help="children's (INFO: a line per webhook)")
    add("--amqp-url", default=DEFAULT_AMQP_URL)
    add("--database-url", default=DEFAULT_DATABASE_URL)
    add("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        args.rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    except ValueError:
        parser.error("--rates must be numbers separated by commas")
    if not args.rates or not all(1 <= rate <= 10_000 for rate in args.rates):
        parser.error("each rate must be within 1..10000")
    if not 1 <= args.duration <= 600 or not 1 <= args.connections <= 1000:
        parser.error("--duration must be within 1..600, --connections within 1..1000")
    if max([*args.rates, args.search_max * args.search]) * args.duration > MAX_WEBHOOKS:
        parser.error(f"rate x duration must stay within {MAX_WEBHOOKS} webhooks")
    if args.search_step <= 0 or not 0 <= args.end_delay <= 60:
        parser.error("--search-step must be positive, --end-delay within 0..60")
    require_local(args.amqp_url, "--amqp-url")
    require_local(args.database_url, "--database-url")
    return args


def main(argv: Sequence[str]) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
