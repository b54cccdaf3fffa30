"""Webhook to row: time from a Roistat POST to its row in PostgreSQL, through the whole pipeline.

Runs `callpipe setup`, then `callpipe ingress`, `callpipe worker start` and `callpipe worker
end` as subprocesses on a fresh namespace, posts calls (a start, then an end, per call) and
reads back, per webhook, `call_events.processed_at` / `published_at` (written by the worker,
same machine clock). Two phases: `saturate` (closed loop, fixed concurrency: the throughput)
and `paced` (open loop at a fixed rate below it: the latency without a backlog). Beside them,
the broker's own ceiling: K persistent messages through a throwaway quorum queue, consumed
with prefetch and an ack each.

    .venv/bin/python bench/webhook_to_row.py [--calls 500] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
import aiohttp
import asyncpg
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from benchlib import (
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

from schemas.topology import Topology

HEADERS = {"Content-Type": "application/json"}
POLL_INTERVAL_S = 0.01

# --- the broker's ceiling ------------------------------------------------------------------


@dataclass(frozen=True)
class Ceiling:
    messages: int
    publish_per_s: float
    consume_per_s: float


async def broker_ceiling(
    connection: AbstractConnection, queue_name: str, count: int, prefetch: int, body: bytes
) -> Ceiling:
    """Publish `count` persistent messages (confirmed, pipelined), then consume and ack each."""
    window = 256
    async with connection.channel(publisher_confirms=True) as channel:
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        started = time.perf_counter()
        for first in range(0, count, window):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        queue_name,
                    )
                    for _ in range(min(window, count - first))
                )
            )
        published_s = time.perf_counter() - started

    async with connection.channel() as channel:
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=False)
        done = asyncio.Event()
        acked = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal acked
            await message.ack()
            acked += 1
            if acked >= count:
                done.set()

        started = time.perf_counter()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=60)
        consumed_s = time.perf_counter() - started
        await queue.cancel(tag)
        await channel.queue_delete(queue_name)
    return Ceiling(count, count / published_s, count / consumed_s)


# --- posting webhooks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    kind: str
    sent_at: float  # wall clock (time.time()), comparable with PostgreSQL's now()
    http_s: float
    status: int | None  # None: no answer (connection error, timeout)
    event_id: str | None


@dataclass
class Phase:
    name: str
    calls: int
    rate: float | None  # webhooks/s offered; None: closed loop at `concurrency`
    concurrency: int
    sent: list[Sent] = field(default_factory=list)
    posting_s: float = 0.0
    first_sent_at: float = 0.0
    all_stored_at: float | None = None
    processed_at: dict[str, float] = field(default_factory=dict)
    published_at: dict[str, float] = field(default_factory=dict)
    complete_calls: int = 0

    @property
    def accepted(self) -> list[Sent]:
        return [one for one in self.sent if one.status == 200 and one.event_id]

    @property
    def failures(self) -> Counter[str]:
        return Counter(str(one.status) for one in self.sent if one.status != 200)


async def post(session: aiohttp.ClientSession, url: str, kind: str, body: bytes) -> Sent:
    sent_at = time.time()
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=HEADERS) as response:
            answer = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return Sent(kind, sent_at, time.perf_counter() - started, None, None)
    event_id = answer.get("event_id") if isinstance(answer, dict) else None
    return Sent(kind, sent_at, time.perf_counter() - started, status, event_id)


async def post_calls(base: str, phase: Phase, calls: Sequence[tuple[bytes, bytes]]) -> None:
    """Each call: its start, then (once answered, or at its slot when paced) its end."""
    start_url = f"{base}/roistat/{BENCH_TOKEN}/call-start"
    end_url = f"{base}/roistat/{BENCH_TOKEN}/call-end"
    limit = phase.concurrency if phase.rate is None else 256
    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def one_call(start: bytes, end: bytes, slot: float | None) -> None:
            phase.sent.append(await post(session, start_url, "start", start))
            if slot is not None and phase.rate is not None:
                await asyncio.sleep(max(0.0, slot + 1.0 / phase.rate - time.perf_counter()))
            phase.sent.append(await post(session, end_url, "end", end))

        phase.first_sent_at = time.time()
        started = time.perf_counter()
        if phase.rate is None:
            pending = iter(calls)

            async def client() -> None:
                for start, end in pending:
                    await one_call(start, end, None)

            await asyncio.gather(*(client() for _ in range(phase.concurrency)))
        else:
            interval = 2.0 / phase.rate  # two webhooks per call

            async def paced(index: int, start: bytes, end: bytes) -> None:
                slot = started + index * interval
                await asyncio.sleep(max(0.0, slot - time.perf_counter()))
                await one_call(start, end, slot)

            await asyncio.gather(*(paced(i, s, e) for i, (s, e) in enumerate(calls)))
        phase.posting_s = time.perf_counter() - started


# --- reading rows back ---------------------------------------------------------------------


async def wait_for_rows(
    pool: asyncpg.Pool, namespace: str, phase: Phase, procs: Subprocesses, timeout_s: float
) -> None:
    """Poll `call_events` every 10 ms until every accepted webhook's row is there.

    Then wait (same deadline) for their events' `published_at` too, and read both times.
    """
    ids = [one.event_id for one in phase.accepted]
    table = f'"{namespace}".call_events'
    stored_query = f"SELECT count(*) FROM {table} WHERE event_id = ANY($1::text[])"
    published_query = f"{stored_query} AND published_at IS NOT NULL"
    deadline = time.monotonic() + timeout_s
    for what, query in (("rows", stored_query), ("published events", published_query)):
        while True:
            found = await pool.fetchval(query, ids)
            if found == len(ids):
                if phase.all_stored_at is None:
                    phase.all_stored_at = time.time()
                break
            procs.check_alive()
            if time.monotonic() > deadline:
                print(f"  {phase.name}: only {found} of {len(ids)} {what} after {timeout_s:g}s")
                break
            await asyncio.sleep(POLL_INTERVAL_S)
        if phase.all_stored_at is None:
            break
    rows = await pool.fetch(
        f"SELECT event_id, processed_at, published_at FROM {table}"
        " WHERE event_id = ANY($1::text[])",
        ids,
    )
    for row in rows:
        phase.processed_at[row["event_id"]] = row["processed_at"].timestamp()
        if row["published_at"] is not None:
            phase.published_at[row["event_id"]] = row["published_at"].timestamp()
    call_ids = sorted({one.event_id.split(":")[1] for one in phase.accepted if one.event_id})
    phase.complete_calls = await pool.fetchval(
        f'SELECT count(*) FROM "{namespace}".calls WHERE call_id = ANY($1::text[])'
        " AND start_received_at IS NOT NULL AND end_received_at IS NOT NULL",
        call_ids,
    )


async def run_phase(
    phase: Phase,
    base: str,
    payloads: Payloads,
    first_index: int,
    pool: asyncpg.Pool,
    namespace: str,
    procs: Subprocesses,
    timeout_s: float,
) -> Phase:
    calls = []
    for index in range(first_index, first_index + phase.calls):
        start = payloads.start(index)
        calls.append((encode(start), encode(payloads.end(start))))
    how = "closed loop" if phase.rate is None else f"{phase.rate:.0f} webhooks/s offered"
    print(f"  {phase.name}: {phase.calls} calls = {2 * phase.calls} webhooks, {how} ...")
    await post_calls(base, phase, calls)
    await wait_for_rows(pool, namespace, phase, procs, timeout_s)
    return phase


# --- report --------------------------------------------------------------------------------


def rate(count: int, seconds: float | None) -> str:
    return "-" if not seconds or seconds <= 0 else f"{count / seconds:.0f}"


def e2e_rate(phase: Phase) -> float | None:
    if phase.all_stored_at is None:
        return None
    return len(phase.accepted) / (phase.all_stored_at - phase.first_sent_at)


def report(phases: Sequence[Phase], ceiling: Ceiling | None, prefetch: int) -> None:
    print()
    print("throughput (webhooks/s)")
    rows = []
    for phase in phases:
        accepted = phase.accepted
        span = None
        if len(phase.processed_at) > 1:
            span = max(phase.processed_at.values()) - min(phase.processed_at.values())
        stored = phase.all_stored_at
        rows.append(
            [
                phase.name,
                str(len(phase.sent)),
                str(len(accepted)),
                str(len(phase.sent) - len(accepted)),
                rate(len(phase.sent), phase.posting_s),
                "-" if stored is None else f"{stored - phase.first_sent_at:.2f}",
                rate(len(accepted), None if stored is None else stored - phase.first_sent_at),
                rate(len(phase.processed_at), span),
                f"{phase.complete_calls}/{phase.calls}",
            ]
        )
    print_table(
        [
            "phase",
            "webhooks",
            "200s",
            "errors",
            "posted/s",
            "all stored s",
            "end-to-end/s",
            "workers/s",
            "calls complete",
        ],
        rows,
    )
    print()
    print("latency per webhook, ms, from the moment its POST was sent")
    rows = []
    for phase in phases:
        accepted = phase.accepted
        series = {
            "200 answered": [one.http_s for one in accepted],
            "row stored (processed_at)": [
                phase.processed_at[one.event_id] - one.sent_at
                for one in accepted
                if one.event_id in phase.processed_at
            ],
            "event published (published_at)": [
                phase.published_at[one.event_id] - one.sent_at
                for one in accepted
                if one.event_id in phase.published_at
            ],
        }
        for what, samples in series.items():
            spread = Spread.of(samples)
            rows.append(
                [
                    f"{phase.name}: {what}",
                    str(len(samples)),
                    fmt_ms(spread.p50 if spread else None),
                    fmt_ms(spread.p95 if spread else None),
                    fmt_ms(spread.p99 if spread else None),
                    fmt_ms(spread.max if spread else None),
                ]
            )
    print_table(["phase: until", "n", "p50", "p95", "p99", "max"], rows)
    for phase in phases:
        if phase.failures:
            print(f"{phase.name}: non-200 answers: {dict(phase.failures)}")
    if ceiling is None:
        return
    print()
    print("side by side: the broker's ceiling vs the workers, on this machine")
    rows = [
        [
            "broker: publish, persistent, confirmed (1 channel)",
            str(ceiling.messages),
            f"{ceiling.publish_per_s:.0f}",
        ],
        [
            f"broker: consume + ack each (1 consumer, prefetch {prefetch})",
            str(ceiling.messages),
            f"{ceiling.consume_per_s:.0f}",
        ],
    ]
    for phase in phases:
        e2e = e2e_rate(phase)
        rows.append(
            [
                f"callpipe {phase.name}: POST to row stored (2 workers)",
                str(len(phase.accepted)),
                "-" if e2e is None else f"{e2e:.0f}",
            ]
        )
    print_table(["what", "messages", "msgs/s"], rows)


# --- the run -------------------------------------------------------------------------------


async def wait_for_consumers(
    connection: AbstractConnection, queues: Sequence[str], procs: Subprocesses
) -> None:
    deadline = time.monotonic() + 30
    while True:
        procs.check_alive()
        counts = [(await queue_depth(connection, queue))[1] for queue in queues]
        if all(counts):
            return
        if time.monotonic() > deadline:
            procs.failed = True
            consumers = dict(zip(queues, counts, strict=True))
            raise RuntimeError(f"workers not consuming after 30s: {consumers}")
        await asyncio.sleep(0.1)


async def bench(args: argparse.Namespace, procs: Subprocesses) -> int:
    cancel_on_sigterm()
    namespace = new_namespace()
    topology = Topology(namespace)
    ceiling_queue = f"{namespace}.bench-ceiling"
    port = free_port()
    env = callpipe_env(
        namespace,
        args.amqp_url,
        args.database_url,
        http_port=str(port),
        prefetch=str(args.worker_prefetch),
        log_level=args.log_level,
    )
    payloads = Payloads(args.seed)
    connection = await aio_pika.connect(args.amqp_url)
    pool: asyncpg.Pool | None = None
    try:
        print("webhook to row: Roistat POST -> ingress -> RabbitMQ -> worker -> PostgreSQL")
        print(f"  saturate: {args.calls} calls ({2 * args.calls} webhooks), start then end")
        print(f"    per call, closed loop over {args.concurrency} concurrent calls")
        paced = "skipped"
        if args.paced_calls:
            offered = f"{args.rate:g} webhooks/s" if args.rate else "half the saturate rate"
            paced = f"{args.paced_calls} calls ({2 * args.paced_calls} webhooks) at {offered}"
        print(f"  paced: {paced}")
        print(f"  broker ceiling: {args.ceiling_messages} messages, prefetch {args.prefetch}")
        print(f"  worker prefetch (CALLPIPE_PREFETCH): {args.worker_prefetch}")
        print(f"  subprocess log level: {args.log_level}; row poll every 10 ms")
        print(f"  namespace: {namespace}, RabbitMQ {await broker_version(connection)}")
        print(f"  {machine_line()}")
        setup = [sys.executable, "-m", "callpipe", "setup"]
        await procs.run_to_end("setup", setup, env, timeout_s=60)

        ceiling = None
        if args.ceiling_messages:
            print(f"  broker ceiling: {args.ceiling_messages} messages ...")
            body = encode(payloads.start(10**6))
            ceiling = await broker_ceiling(
                connection, ceiling_queue, args.ceiling_messages, args.prefetch, body
            )

        procs.start("ingress", [sys.executable, "-m", "callpipe", "ingress"], env)
        for kind in ("start", "end"):
            argv = [sys.executable, "-m", "callpipe", "worker", kind]
            procs.start(f"worker-{kind}", argv, env)
        base = f"http://{LOCALHOST}:{port}"
        await wait_http_ok(f"{base}/readyz", procs, what="callpipe ingress")
        queues = [topology.call_queue("start"), topology.call_queue("end")]
        await wait_for_consumers(connection, queues, procs)
        pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)

        phases = [
            await run_phase(
                Phase("saturate", args.calls, None, args.concurrency),
                base,
                payloads,
                0,
                pool,
                namespace,
                procs,
                args.drain_timeout,
            )
        ]
        saturate_rate = e2e_rate(phases[0])
        paced_rate = args.rate or (saturate_rate / 2 if saturate_rate else None)
        if args.paced_calls and paced_rate:
            phase = Phase("paced", args.paced_calls, paced_rate, args.concurrency)
            phases.append(
                await run_phase(
                    phase, base, payloads, args.calls, pool, namespace, procs, args.drain_timeout
                )
            )
        dead, _ = await queue_depth(connection, topology.dead_queue)
        rejected, _ = await queue_depth(connection, topology.rejected_queue)
        report(phases, ceiling, args.prefetch)
        print()
        print(f"{topology.dead_queue}: {dead} messages, {topology.rejected_queue}: {rejected}")
        incomplete = any(
            phase.all_stored_at is None
            or phase.failures
            or phase.complete_calls != phase.calls
            or len(phase.processed_at) != 2 * phase.calls
            for phase in phases
        )
        return 1 if incomplete or dead or rejected else 0
    finally:
        procs.stop_all()
        if pool is not None:
            await pool.close()
        await connection.close()
        await remove_namespace(
            args.amqp_url,
            namespace,
            database_url=args.database_url,
            extra_queues=[ceiling_queue],
        )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=500, help="saturate phase (default 500)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (16)")
    parser.add_argument(
        "--paced-calls", type=int, default=250, help="paced phase, 0 to skip (default 250)"
    )
    parser.add_argument(
        "--rate", type=float, default=0, help="paced webhooks/s (default: half the saturate rate)"
    )
    parser.add_argument("--ceiling-messages", type=int, default=5000, help="0 to skip")
    parser.add_argument("--prefetch", type=int, default=32, help="broker ceiling's prefetch")
    parser.add_argument("--worker-prefetch", type=int, default=32, help="CALLPIPE_PREFETCH")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="CALLPIPE_LOG_LEVEL of the children (default INFO: a line per webhook)",
    )
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 20_000:
        parser.error("--calls must be within 1..20000")
    if not 0 <= args.paced_calls <= 20_000:
        parser.error("--paced-calls must be within 0..20000")
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be within 1..1000")
    if not 0 <= args.rate <= 100_000:
        parser.error("--rate must be within 0..100000")
    if not 0 <= args.ceiling_messages <= 100_000:
        parser.error("--ceiling-messages must be within 0..100000")
    if not 1 <= args.prefetch <= 10_000 or not 1 <= args.worker_prefetch <= 10_000:
        parser.error("prefetch must be within 1..10000")
    require_local(args.amqp_url, "--amqp-url")
    require_local(args.database_url, "--database-url")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    return run_bench(bench, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
