"""Ingress throughput: bare aiohttp vs channel-per-request publishing vs `callpipe ingress`.

Each server runs in a subprocess of its own (on uvloop, like callpipe); one load generator
(aiohttp client, this process) drives them in turn with the same ~1 KB Roistat call-start
bodies. For the publishing variants the call-start queue must hold exactly as many messages
as there were 200s: a 200 means queued.

    .venv/bin/python bench/ingress_throughput.py [--requests 5000] [--concurrency 64]

`serve bare|naive` (used internally) runs one of the comparison servers.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aiohttp import web
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
    declare_namespace,
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

from callpipe.runner import run
from schemas.topology import ROUTING_KEY_BY_KIND, Topology

VARIANTS = ("bare", "naive", "callpipe")
ROUTING_KEY = ROUTING_KEY_BY_KIND["start"]

# --- the comparison servers (subprocesses) -------------------------------------------------

CONNECTION = web.AppKey("connection", AbstractRobustConnection)
NAMESPACE = web.AppKey("namespace", str)


async def bare_webhook(request: web.Request) -> web.Response:
    """Read the body, answer 200: the ceiling of aiohttp itself."""
    await request.read()
    return web.json_response({"accepted": True})


async def naive_webhook(request: web.Request) -> web.Response:
    """The obvious way: a fresh confirmed channel per request, publish, wait, close."""
    body = await request.read()
    exchange_name = Topology(request.app[NAMESPACE]).webhooks_exchange
    try:
        async with request.app[CONNECTION].channel(
            publisher_confirms=True, on_return_raises=True
        ) as channel:
            exchange = await channel.get_exchange(exchange_name, ensure=False)
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                ROUTING_KEY,
                mandatory=True,
                timeout=5.0,
            )
    except Exception as exc:
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=503)
    return web.json_response({"accepted": True})


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def comparison_app(variant: str, amqp_url: str, namespace: str) -> web.Application:
    app = web.Application()
    app[NAMESPACE] = namespace
    app.router.add_get("/readyz", ready)
    if variant == "bare":
        app.router.add_post("/roistat/{token}/call-start", bare_webhook)
        return app

    async def broker(app: web.Application) -> AsyncIterator[None]:
        connection = await aio_pika.connect_robust(amqp_url)
        app[CONNECTION] = connection
        yield
        await connection.close()

    app.cleanup_ctx.append(broker)
    app.router.add_post("/roistat/{token}/call-start", naive_webhook)
    return app


async def serve(variant: str, port: int, amqp_url: str, namespace: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        comparison_app(variant, amqp_url, namespace), handle_signals=False, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, LOCALHOST, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


# --- the load generator --------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    elapsed_s: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def errors(self) -> int:
        return self.requests - self.ok


async def drive(url: str, bodies: Sequence[bytes], concurrency: int) -> LoadResult:
    """Send every body once over `concurrency` keep-alive connections, as fast as answered."""
    result = LoadResult(requests=len(bodies))
    pending = iter(bodies)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(session: aiohttp.ClientSession) -> None:
        for body in pending:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    result.statuses[response.status] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.failures[type(exc).__name__] += 1
                continue
            result.latencies_s.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - started
    return result


@dataclass
class VariantRun:
    variant: str
    label: str  # the variant, with its round when there are several
    result: LoadResult
    queued: int | None  # messages in {ns}.call-start after the run; None: does not publish


def start_server(
    procs: Subprocesses, variant: str, port: int, amqp_url: str, namespace: str
) -> str:
    """Start the variant's server; its base URL for webhooks."""
    if variant == "callpipe":
        env = callpipe_env(namespace, amqp_url, DEFAULT_DATABASE_URL, http_port=str(port))
        procs.start(variant, [sys.executable, "-m", "callpipe", "ingress"], env)
    else:
        argv = [sys.executable, __file__, "serve", variant, "--port", str(port)]
        argv += ["--amqp-url", amqp_url, "--namespace", namespace]
        procs.start(variant, argv, callpipe_env(namespace, amqp_url, DEFAULT_DATABASE_URL))
    return f"http://{LOCALHOST}:{port}"


async def settled_depth(connection: AbstractConnection, queue: str, expected: int) -> int:
    """The queue's depth; re-read for up to 3 s while it differs from `expected`."""
    deadline = time.monotonic() + 3.0
    while True:
        depth, _ = await queue_depth(connection, queue)
        if depth == expected or time.monotonic() > deadline:
            return depth
        await asyncio.sleep(0.2)


async def purge(connection: AbstractConnection, queue: str) -> None:
    async with connection.channel() as channel:
        await (await channel.get_queue(queue, ensure=False)).purge()


async def run_variant(
    variant: str,
    round_: int,
    args: argparse.Namespace,
    namespace: str,
    bodies: Sequence[bytes],
    warmup: Sequence[bytes],
    connection: AbstractConnection,
    procs: Subprocesses,
) -> VariantRun:
    queue = Topology(namespace).call_queue("start")
    base = start_server(procs, variant, free_port(), args.amqp_url, namespace)
    try:
        await wait_http_ok(f"{base}/readyz", procs, what=variant)
        url = f"{base}/roistat/{BENCH_TOKEN}/call-start"
        if warmup:
            await drive(url, warmup, args.concurrency)
        await purge(connection, queue)
        print(f"  {variant} (round {round_}): {len(bodies)} requests ...", flush=True)
        result = await drive(url, bodies, args.concurrency)
        procs.check_alive()
    finally:
        code = procs.stop(variant)
        if code not in (0, None):
            procs.failed = True
            print(f"  {variant} server exited with {code}", file=sys.stderr)
    queued = None
    if variant != "bare":
        queued = await settled_depth(connection, queue, result.ok)
    await purge(connection, queue)
    label = variant if args.rounds == 1 else f"{variant} #{round_}"
    return VariantRun(variant, label, result, queued)


def report(runs: Sequence[VariantRun], namespace: str) -> bool:
    """Print the table; False if a publishing variant's 200s and queued messages differ."""
    headers = ["variant", "requests", "ok", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"]
    headers += ["max ms", "queued"]
    rows = []
    for one in runs:
        spread = Spread.of(one.result.latencies_s)
        rows.append(
            [
                one.label,
                str(one.result.requests),
                str(one.result.ok),
                str(one.result.errors),
                f"{one.result.requests / one.result.elapsed_s:.0f}",
                fmt_ms(spread.p50 if spread else None),
                fmt_ms(spread.p95 if spread else None),
                fmt_ms(spread.p99 if spread else None),
                fmt_ms(spread.max if spread else None),
                "-" if one.queued is None else str(one.queued),
            ]
        )
    print()
    print_table(headers, rows)
    print()
    consistent = True
    for one in runs:
        details = dict(one.result.statuses) | dict(one.result.failures)
        if one.result.errors:
            print(f"{one.label}: non-200 answers and failures: {details}")
        if one.queued is not None:
            same = one.queued == one.result.ok
            consistent &= same
            verdict = "OK, every 200 was queued" if same else "MISMATCH"
            print(
                f"{one.label}: {one.result.ok} answers 200, "
                f"{one.queued} messages in {namespace}.call-start: {verdict}"
            )
    return consistent


async def bench(args: argparse.Namespace, procs: Subprocesses) -> int:
    cancel_on_sigterm()
    namespace = new_namespace()
    payloads = Payloads(args.seed)
    bodies = [encode(payloads.start(index)) for index in range(args.requests + args.warmup)]
    warmup, measured = bodies[: args.warmup], bodies[args.warmup :]
    connection = await aio_pika.connect(args.amqp_url)
    try:
        print("ingress throughput: bare aiohttp vs naive publish vs callpipe ingress")
        print(f"  requests per variant: {args.requests} (after {args.warmup} warm-up requests)")
        print(f"  concurrency: {args.concurrency} keep-alive connections, one client process")
        mean_size = sum(map(len, measured)) / len(measured)
        print(f"  body: Roistat call start, {mean_size:.0f} bytes on average, a new id each")
        print(f"  variants: {', '.join(args.variants)}; rounds: {args.rounds}")
        print(f"  namespace: {namespace}, RabbitMQ {await broker_version(connection)}")
        print(f"  {machine_line()}")
        await declare_namespace(args.amqp_url, namespace)
        runs = [
            await run_variant(variant, round_, args, namespace, measured, warmup, connection, procs)
            for round_ in range(1, args.rounds + 1)
            for variant in args.variants
        ]
        consistent = report(runs, namespace)
        if args.rounds > 1:
            medians = {
                variant: statistics.median(
                    one.result.requests / one.result.elapsed_s
                    for one in runs
                    if one.variant == variant
                )
                for variant in args.variants
            }
            summary = ", ".join(f"{name} {rate:.0f}" for name, rate in medians.items())
            print(f"median req/s over {args.rounds} rounds: {summary}")
        failed = any(one.result.errors for one in runs) or not consistent
        return 1 if failed else 0
    finally:
        procs.stop_all()
        await connection.close()
        await remove_namespace(args.amqp_url, namespace)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="per variant (default 5000)")
    parser.add_argument("--concurrency", type=int, default=64, help="connections (default 64)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests first")
    parser.add_argument(
        "--variants",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=list(VARIANTS),
        help="comma-separated subset of bare,naive,callpipe",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the variants this many times, interleaved"
    )
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        parser.error("--requests must be within 1..100000")
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be within 1..1000")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be within 1..10")
    if not 0 <= args.warmup <= 10_000:
        parser.error("--warmup must be within 0..10000")
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"--variants must be a subset of {','.join(VARIANTS)}")
    require_local(args.amqp_url, "--amqp-url")
    return args


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["serve"]:
        server = argparse.ArgumentParser(prog="ingress_throughput.py serve")
        server.add_argument("variant", choices=["bare", "naive"])
        server.add_argument("--port", type=int, required=True)
        server.add_argument("--amqp-url", required=True)
        server.add_argument("--namespace", required=True)
        opts = server.parse_args(argv[1:])
        return run(serve(opts.variant, opts.port, opts.amqp_url, opts.namespace))
    args = parse_args(argv)
    return run_bench(bench, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
