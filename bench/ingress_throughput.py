"""Ingress throughput: bare aiohttp vs a plain aiohttp + aio-pika publisher vs `callpipe ingress`.

Each server runs in a subprocess of its own on uvloop. wrk (Debian's `wrk` package) drives
them in turn, at each concurrency, with unique ~1 KB Roistat call-start bodies that a Lua
script builds. `naive` is what a competent user writes without callpipe: one robust
connection, one confirm channel, concurrent publishes pipelined on it. For the publishing
variants, `{ns}.call-start` must then hold exactly as many messages as the server answered
200 (a 200 means queued), and those 200s must cover every 2xx wrk saw.

    .venv/bin/python bench/ingress_throughput.py [--connections 64,8] [--duration 10]

`serve bare|naive ...` (used internally) runs one of the comparison servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from string import Template

import aio_pika
import aiohttp
import orjson
import uvloop
from aio_pika.abc import AbstractConnection, AbstractExchange, HeadersType
from aiohttp import web
from benchlib import (
    BENCH_PROJECT,
    BENCH_TOKEN,
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    LOCALHOST,
    Payloads,
    Subprocesses,
    broker_version,
    callpipe_env,
    cancel_on_sigterm,
    declare_namespace,
    encode,
    free_port,
    machine_line,
    new_namespace,
    print_table,
    queue_depth,
    remove_namespace,
    require_local,
    run_bench,
)

from schemas import topology as names

VARIANTS = ("bare", "naive", "callpipe")
PATH = f"/roistat/{BENCH_TOKEN}/call-start"
ROUTE = "/roistat/{token}/call-start"

# --- the comparison servers (subprocesses) -------------------------------------------------


@dataclass
class Tally:
    ok: int = 0  # 200s answered, whether or not the client was still there to read them


EXCHANGE = web.AppKey("exchange", AbstractExchange)
TALLY = web.AppKey("tally", Tally)


async def bare_webhook(request: web.Request) -> web.Response:
    """Read the body, answer 200: the ceiling of aiohttp itself."""
    await request.read()
    request.app[TALLY].ok += 1
    return web.json_response({"accepted": True})


async def naive_webhook(request: web.Request) -> web.Response:
    """Check token and body, publish on the shared confirm channel, await the confirm."""
    if request.match_info["token"] != BENCH_TOKEN:
        return web.json_response({"error": "not found"}, status=404)
    body = await request.read()
    try:
        message_id = f"{BENCH_PROJECT}:{orjson.loads(body)['id']}:start"
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return web.json_response({"error": "expected a JSON object with an id"}, status=400)
    headers: HeadersType = {  # the headers callpipe's ingress sets
        names.HEADER_PROJECT: BENCH_PROJECT,
        names.HEADER_KIND: "start",
        names.HEADER_RECEIVED_AT: datetime.now(UTC).isoformat(),
        names.HEADER_REMOTE_ADDR: request.remote or "",
    }
    message = aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/json",
        message_id=message_id,
        headers=headers,
    )
    routing_key = names.ROUTING_KEY_BY_KIND["start"]
    try:
        await request.app[EXCHANGE].publish(message, routing_key, mandatory=True, timeout=5.0)
    except Exception as exc:
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=503)
    request.app[TALLY].ok += 1
    return web.json_response({"accepted": True, "event_id": message_id})


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready", "ok": request.app[TALLY].ok})


def comparison_app(variant: str, amqp_url: str, namespace: str) -> web.Application:
    app = web.Application()
    app[TALLY] = Tally()
    app.router.add_get("/readyz", ready)
    app.router.add_post(ROUTE, bare_webhook if variant == "bare" else naive_webhook)

    async def broker(app: web.Application) -> AsyncIterator[None]:
        # Once, at start-up: one connection, one confirm channel, the exchange looked up.
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        app[EXCHANGE] = await channel.get_exchange(names.Topology(namespace).webhooks_exchange)
        yield
        await connection.close()

    if variant == "naive":
        app.cleanup_ctx.append(broker)
    return app


async def serve(variant: str, port: int, amqp_url: str, namespace: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = comparison_app(variant, amqp_url, namespace)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOCALHOST, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


# --- the load: wrk and its Lua script ------------------------------------------------------

# Each request gets its own id: a prefix per script, the thread's number, a per-thread count.
# `sent` counts the requests written: sent - completed were in flight when wrk stopped (the
# server still answers those, to a closed connection, and publishes them).
LUA = Template("""\
local heads = {$heads}
local tails = {$tails}
local headers = {["Content-Type"] = "application/json"}
local threads = {}
sent = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function request()
  sent = sent + 1
  local i = sent % #heads + 1
  local id = string.format("$prefix%d%09d", tid, sent)
  return wrk.format("POST", "$path", headers, heads[i] .. id .. tails[i])
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("sent") end
  local e = summary.errors
  io.write(string.format("BENCH completed=%d sent=%d duration_us=%d connect=%d read=%d"
    .. " write=%d status=%d timeout=%d p50=%.0f p90=%.0f p99=%.0f max=%.0f\\n",
    summary.requests, total, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
""")


def lua_script(payloads: Payloads, count: int = 16) -> tuple[str, float]:
    """The wrk script: `count` bodies from callpipe's sample generator, the id left open."""
    heads, tails, sizes = [], [], []
    for index in range(count):
        document = payloads.start(index)
        sizes.append(len(encode(document)))
        document["id"] = "@ID@"
        head, tail = encode(document).decode().split('"@ID@"')
        assert "]==]" not in head + tail
        heads.append(f'[==[{head}"]==]')
        tails.append(f'[==["{tail}]==]')
    prefix = str(random.randint(100_000, 999_999))
    text = LUA.substitute(heads=", ".join(heads), tails=", ".join(tails), prefix=prefix, path=PATH)
    return text, statistics.mean(sizes)


@dataclass(frozen=True)
class WrkResult:
    figures: dict[str, int]  # done()'s line: counts, duration and latencies in µs
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core during the run

    def value(self, key: str) -> float:
        """req/s (`rate`), or a latency in ms (`p50`, `p90`, `p99`, `max`)."""
        if key == "rate":
            return self.figures["completed"] / (self.figures["duration_us"] / 1e6)
        return self.figures[key] / 1000.0

    @property
    def failures(self) -> dict[str, int]:
        kinds = ("connect", "read", "write", "status", "timeout")
        return {kind: self.figures[kind] for kind in kinds if self.figures[kind]}

    @property
    def ok(self) -> int:  # wrk's status errors are answers >= 400; these servers send no 3xx
        return self.figures["completed"] - self.figures["status"]

    @property
    def in_flight(self) -> int:
        return self.figures["sent"] - self.figures["completed"]


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_ticks(wrk_pid: int) -> dict[str, int]:
    """CPU ticks of the server (our other children), wrk, RabbitMQ, and everything else."""
    ticks = {"srv": 0, "wrk": 0, "mq": 0}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = path.read_text()
        except OSError:  # gone meanwhile
            continue
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")")[-1].split()
        used = int(fields[11]) + int(fields[12])  # utime + stime
        if int(path.parent.name) == wrk_pid:
            ticks["wrk"] += used
        elif int(fields[1]) == os.getpid():
            ticks["srv"] += used
        elif comm == "beam.smp":
            ticks["mq"] += used
    machine = [int(n) for n in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    busy = sum(machine) - machine[3] - machine[4]  # not idle, not iowait
    ticks["other"] = busy - ticks["srv"] - ticks["wrk"] - ticks["mq"]
    return ticks


async def run_wrk(wrk: str, script: Path, base: str, connections: int, seconds: float) -> WrkResult:
    argv = [wrk, f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    argv += ["--timeout", "5s", "-s", str(script), f"{base}{PATH}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output = asyncio.ensure_future(proc.communicate())
        margin = min(0.5, seconds / 4)  # CPU over the middle of the run, while wrk is alive
        await asyncio.sleep(margin)
        before, started = cpu_ticks(proc.pid), time.monotonic()
        await asyncio.sleep(seconds - 2 * margin)
        after, elapsed = cpu_ticks(proc.pid), time.monotonic() - started
        stdout, _ = await asyncio.wait_for(output, timeout=seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = stdout.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text}")
    figures = {k: int(v) for k, v in (pair.split("=") for pair in lines[-1].split()[1:])}
    # Process and machine ticks are sampled apart: clamp the small negative "other" to 0.
    cpu = {k: max(0.0, 100 * (after[k] - before[k]) / TICKS_PER_S / elapsed) for k in before}
    return WrkResult(figures, cpu)


# --- one variant ---------------------------------------------------------------------------


@dataclass
class VariantRun:
    variant: str
    round: int
    connections: int
    result: WrkResult
    answered_ok: int | None = None  # 200s the server counted; None: it does not publish
    queued: int | None = None  # messages in {ns}.call-start after the run
    spooled: int = 0  # callpipe: 200s for webhooks spooled instead of confirmed

    def label(self, rounds: int) -> str:
        return self.variant if rounds == 1 else f"{self.variant} #{self.round}"


async def server_counts(variant: str, base: str) -> tuple[int, int, int]:
    """(200s answered on the webhook route, webhooks spooled, webhooks still in the spool)."""
    async with aiohttp.ClientSession() as session:
        if variant != "callpipe":
            async with session.get(f"{base}/readyz") as response:
                return int((await response.json())["ok"]), 0, 0
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    ok = spooled = waiting = 0
    for line in text.splitlines():
        value = int(float(line.split()[-1])) if line and not line.startswith("#") else 0
        if line.startswith("callpipe_ingress_requests_total{") and f'route="{ROUTE}"' in line:
            ok += value if 'status="200"' in line else 0
        elif line.startswith('callpipe_ingress_publish_seconds_count{outcome="spooled"}'):
            spooled = value
        elif line.startswith("callpipe_ingress_spool_messages "):
            waiting = value
    return ok, spooled, waiting


async def settled_counts(variant: str, base: str) -> tuple[int, int]:
    """(200s, spooled) once what wrk left in flight is answered and the spool is drained: from
    then on every message the server answered 200 for is confirmed, so in the queue."""
    counts = await server_counts(variant, base)
    for _ in range(120):
        await asyncio.sleep(0.25)
        previous, counts = counts, await server_counts(variant, base)
        if counts == previous and counts[2] == 0:
            return counts[0], counts[1]
    raise RuntimeError(f"{variant} still answering or draining its spool 30 s after wrk stopped")


async def purge(connection: AbstractConnection, queue: str) -> None:
    async with connection.channel() as channel:
        await (await channel.get_queue(queue, ensure=False)).purge()


async def wait_ready(base: str, procs: Subprocesses, variant: str) -> None:
    """Until /readyz is 200 without `spooling`: callpipe's broker link is up, too."""
    for _ in range(300):
        procs.check_alive()
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.request("GET", f"{base}/readyz") as response:
                if response.status == 200 and not (await response.json()).get("spooling"):
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{variant} not ready after 30 s")


async def run_variant(
    variant: str,
    round_: int,
    args: argparse.Namespace,
    namespace: str,
    script: Path,
    connection: AbstractConnection,
    procs: Subprocesses,
) -> list[VariantRun]:
    """Start the variant's server; one warm-up and one timed wrk run per concurrency."""
    queue = names.Topology(namespace).call_queue("start")
    port = free_port()
    base = f"http://{LOCALHOST}:{port}"
    env = callpipe_env(namespace, args.amqp_url, DEFAULT_DATABASE_URL)
    argv = [sys.executable, __file__, "serve", variant, str(port), args.amqp_url, namespace]
    if variant == "callpipe":
        argv = [sys.executable, "-m", "callpipe", "ingress"]
        env["CALLPIPE_HTTP_PORT"] = str(port)
        env["CALLPIPE_SPOOL_DIR"] = tempfile.mkdtemp(prefix="spool-", dir=procs.log_dir)
        env["CALLPIPE_DRAIN_S"] = "0"  # no load balancer to wait for: stop at once
    procs.start(variant, argv, env)
    runs = []
    try:
        await wait_ready(base, procs, variant)
        for connections in args.connections:
            if args.warmup:
                await run_wrk(args.wrk, script, base, connections, args.warmup)
            before = await settled_counts(variant, base)
            await purge(connection, queue)
            print(f"  {variant}, C={connections}, round {round_} ...", flush=True)
            result = await run_wrk(args.wrk, script, base, connections, args.duration)
            procs.check_alive()
            one = VariantRun(variant, round_, connections, result)
            after = await settled_counts(variant, base)
            if variant != "bare":
                one.answered_ok, one.spooled = after[0] - before[0], after[1] - before[1]
                one.queued, _ = await queue_depth(connection, queue)
            await purge(connection, queue)
            runs.append(one)
    finally:
        code = procs.stop(variant)
        if code not in (0, None):
            procs.failed = True
            print(f"  {variant} server exited with {code}", file=sys.stderr)
    return runs


# --- report --------------------------------------------------------------------------------


def check(one: VariantRun, label: str, namespace: str) -> bool:
    """No failures; the queue holds the server's 200s, which cover wrk's 2xx."""
    result, passed = one.result, not one.result.failures
    if result.failures:
        print(f"{label}: failures {result.failures}")
    if one.answered_ok is None or one.queued is None:
        return passed
    late = one.answered_ok - result.ok  # answered after wrk hung up; published all the same
    # A webhook spooled on a confirm timeout may have reached the queue too: then the drained
    # copy is a duplicate (same message id; the workers deduplicate it).
    extra = one.queued - one.answered_ok
    same = 0 <= extra <= one.spooled and 0 <= late <= result.in_flight
    print(
        f"{label}: wrk got {result.ok} 2xx; the server answered {one.answered_ok} 200s"
        f" ({late} after wrk stopped, of {result.in_flight} in flight)"
        + (f", {one.spooled} spooled ({extra} duplicates)" if one.spooled else "")
        + f"; {one.queued} in {namespace}.call-start: {'OK' if same else 'MISMATCH'}"
    )
    return passed and same


def report(runs: Sequence[VariantRun], args: argparse.Namespace, namespace: str) -> bool:
    """Print the table, the ratios and the checks; False if a check failed."""
    headers = ["variant", "C", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "non-2xx"]
    rows = []
    for one in runs:
        res = one.result
        rows.append(
            [one.label(args.rounds), str(one.connections), f"{res.value('rate'):.0f}"]
            + [f"{res.value(key):.1f}" for key in ("p50", "p90", "p99", "max")]
            + [str(sum(res.failures.values())), "-" if one.queued is None else str(one.queued)]
            + ["/".join(f"{res.cpu[key]:.0f}" for key in ("srv", "wrk", "mq", "other"))]
        )
    print()
    print_table([*headers, "queued", "CPU% srv/wrk/mq/other"], rows)
    if busy := [one for one in runs if one.result.cpu["other"] > 25]:
        print(f"WARNING: other processes took > 25% of a core in {len(busy)} of {len(runs)} runs")
        print("(CPU% other): the machine was not quiet, so the rows do not compare well.")

    def median(variant: str, connections: int, key: str) -> float:
        return statistics.median(
            one.result.value(key)
            for one in runs
            if (one.variant, one.connections) == (variant, connections)
        )

    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds")
        print_table(
            ["variant", "C", "req/s", "p50 ms", "p99 ms"],
            [
                [v, str(c), f"{median(v, c, 'rate'):.0f}"]
                + [f"{median(v, c, key):.1f}" for key in ("p50", "p99")]
                for v in args.variants
                for c in args.connections
            ],
        )
    if {"naive", "callpipe"} <= set(args.variants):
        print()
        for c in args.connections:
            rate = median("callpipe", c, "rate") / median("naive", c, "rate")
            p99 = median("callpipe", c, "p99") / median("naive", c, "p99")
            print(f"callpipe / naive, C={c}: req/s {rate:.2f}x, p99 {p99:.2f}x")
    print()
    labels = [f"{one.label(args.rounds)} C={one.connections}" for one in runs]
    return all([check(one, label, namespace) for one, label in zip(runs, labels, strict=True)])


async def bench(args: argparse.Namespace, procs: Subprocesses) -> int:
    cancel_on_sigterm()
    namespace = new_namespace()
    text, mean_size = lua_script(Payloads(args.seed))
    script = procs.log_dir / "bodies.lua"
    script.write_text(text, encoding="utf-8")
    connection = await aio_pika.connect(args.amqp_url)
    try:
        print("ingress throughput: bare aiohttp vs aiohttp + aio-pika (naive) vs callpipe ingress")
        print(f"  load: {args.wrk} -t2, connections {','.join(map(str, args.connections))}")
        print(f"  {args.duration:g} s per run, each after a {args.warmup:g} s warm-up")
        print(f"  body: Roistat call start, {mean_size:.0f} bytes on average, a new id each")
        print(f"  variants: {', '.join(args.variants)}; rounds: {args.rounds}")
        print(f"  namespace: {namespace}, RabbitMQ {await broker_version(connection)}")
        print(f"  {machine_line()}")
        await declare_namespace(args.amqp_url, namespace)
        runs = []
        for round_ in range(1, args.rounds + 1):
            for variant in args.variants:
                runs += await run_variant(
                    variant, round_, args, namespace, script, connection, procs
                )
        return 0 if report(runs, args, namespace) else 1
    finally:
        procs.stop_all()
        await connection.close()
        await remove_namespace(args.amqp_url, namespace)


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add(
        "--connections",
        type=lambda text: [int(c) for c in comma_list(text)],
        default=[64, 8],
        help="wrk connections; one run each (default 64,8)",
    )
    add("--duration", type=float, default=10.0, help="seconds per timed run (default 10)")
    add("--warmup", type=float, default=2.0, help="seconds of untimed load first (default 2)")
    add("--variants", type=comma_list, default=list(VARIANTS), help="subset of bare,naive,callpipe")
    add("--rounds", type=int, default=1, help="interleaved repetitions; medians printed (1)")
    add("--wrk", default=shutil.which("wrk"), help="the wrk binary (default: wrk on PATH)")
    add("--amqp-url", default=DEFAULT_AMQP_URL)
    add("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    limits = {"duration": (1, 300), "warmup": (0, 60), "rounds": (1, 10)}
    for name, (low, high) in limits.items():
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name} must be within {low}..{high}")
    if not args.connections or not all(1 <= c <= 1000 for c in args.connections):
        parser.error("--connections must be within 1..1000")
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"--variants must be a subset of {','.join(VARIANTS)}")
    if args.wrk is None or not os.access(args.wrk, os.X_OK):
        raise SystemExit("wrk not found: install Debian's wrk package: apt-get install wrk")
    require_local(args.amqp_url, "--amqp-url")
    return args


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["serve"]:  # serve VARIANT PORT AMQP_URL NAMESPACE, from run_variant
        _, variant, port, amqp_url, namespace = argv
        # Plain uvloop, as their author would run them: not callpipe's runner (its GC tuning).
        return uvloop.run(serve(variant, int(port), amqp_url, namespace))
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
