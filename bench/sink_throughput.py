"""Sink throughput: one `[[webhook]]` sink vs a plain aio-pika consumer vs the client alone.

A receiver (aiohttp, a subprocess of its own on uvloop) answers 200 to every POST, counts
distinct `webhook-id`s and checks the Standard Webhooks signature of a sample. For each
concurrency C, the same N call.ended envelopes (built by callpipe's own enrichment from
Roistat-shaped bodies) are preloaded into `{ns}.events`, so they sit in the sink's queue,
and then delivered by:

- `callpipe`: `sinks.service.run_sinks` with one webhook sink, `max_in_flight = C`;
- `aio-pika peer`: a consumer with prefetch C that signs, POSTs with one shared aiohttp
  session and acks after a 2xx: what a user would write without callpipe;
- `client ceiling`: the same signing and POSTs at concurrency C, without a broker.

The three run in this process, one after the other, on the same uvloop. Each rate is N
divided by the time from the variant's start (connecting included) to the receiver's N-th
distinct event; both ends read CLOCK_MONOTONIC, which is system-wide. "CPU µs/ev" is this
process's CPU time over the same span, per event: on 2 shared cores, the figure to compare.

    .venv/bin/python bench/sink_throughput.py [--events 5000] [--concurrency 1,8,32]

`receive` (used internally) runs the receiver.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiohttp import web
from benchlib import (
    DEFAULT_AMQP_URL,
    LOCALHOST,
    Payloads,
    Spread,
    Subprocesses,
    broker_version,
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
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from infra.broker import declare_topology
from infra.runner import run
from infra.settings import Settings
from schemas.events import CallEvent
from schemas.roistat import CallEndPayload
from schemas.topology import Topology, event_routing_key
from sinks.service import run_sinks
from sinks.topology import declare_sink, delay_queue
from sinks.webhook import WebhookSinkConfig
from workers.enrich import enrich

SINK_NAME = "bench"
PROJECT = "bench"
SECRET_ENV = "BENCH_WEBHOOK_SECRET"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as infra.logs
PUBLISH_WINDOW = 512
VARIANTS = ("callpipe", "aio-pika peer", "client ceiling")

# --- the receiver (subprocess) -------------------------------------------------------------


class Receiver:
    """Counts the POSTs of one variant; verifies the signature of every n-th and the first."""

    def __init__(self, secret: str, verify_every: int) -> None:
        self._signer = Webhook(secret)
        self._verify_every = verify_every
        self.reset(0)

    def reset(self, expect: int) -> None:
        self.expect = expect
        self.requests = 0
        self.ids: set[str] = set()
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.verified = 0
        self.bad_signatures = 0
        self.cpu_at_reset = time.process_time()
        self.cpu_s: float | None = None
        self.done = asyncio.Event()

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        self.requests += 1
        if self.first_at is None:
            self.first_at = now
        self.ids.add(request.headers.get("webhook-id", ""))
        if self.requests == 1 or self.requests % self._verify_every == 0:
            headers = {key.lower(): value for key, value in request.headers.items()}
            try:
                self._signer.verify(body, headers, json_parse=False)
                self.verified += 1
            except WebhookVerificationError:
                self.bad_signatures += 1
        if self.done_at is None and self.expect and len(self.ids) >= self.expect:
            self.done_at = now
            self.cpu_s = time.process_time() - self.cpu_at_reset
            self.done.set()
        return web.Response()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "distinct": len(self.ids),
            "first_at": self.first_at,
            "done_at": self.done_at,
            "verified": self.verified,
            "bad_signatures": self.bad_signatures,
            "cpu_s": self.cpu_s,
        }


RECEIVER = web.AppKey("receiver", Receiver)


async def reset_receiver(request: web.Request) -> web.Response:
    request.app[RECEIVER].reset(int(request.query["expect"]))
    return web.json_response({})


async def wait_receiver(request: web.Request) -> web.Response:
    """Long poll: the stats once the expected events are in, or after `timeout` seconds."""
    receiver = request.app[RECEIVER]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receiver.done.wait(), timeout=float(request.query["timeout"]))
    return web.json_response(receiver.stats())


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve_receiver(port: int, verify_every: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = web.Application(client_max_size=1024**2)
    app[RECEIVER] = Receiver(os.environ[SECRET_ENV], verify_every)
    app.router.add_post("/hook", app[RECEIVER].hook)
    app.router.add_post("/reset", reset_receiver)
    app.router.add_get("/wait", wait_receiver)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOCALHOST, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


@dataclass(frozen=True)
class ReceiverStats:
    requests: int
    distinct: int
    first_at: float | None
    done_at: float | None
    verified: int
    bad_signatures: int
    cpu_s: float | None  # the receiver's CPU time from its reset to the last event


class ReceiverClient:
    """The bench's side of the receiver: reset it before a variant, wait for its N events."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.hook_url = f"{base}/hook"
        self._base = base
        self._session = session

    async def reset(self, expect: int) -> None:
        async with self._session.post(f"{self._base}/reset", params={"expect": expect}) as r:
            r.raise_for_status()

    async def wait_done(
        self, timeout_s: float, procs: Subprocesses, alongside: asyncio.Task[Any] | None = None
    ) -> ReceiverStats:
        """The stats once every event arrived, or as they stand at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            procs.check_alive()
            if alongside is not None and alongside.done():
                alongside.result()  # raises what the variant raised
                raise RuntimeError(f"{alongside.get_name()} stopped before the last delivery")
            async with self._session.get(f"{self._base}/wait", params={"timeout": "0.5"}) as r:
                stats = ReceiverStats(**await r.json())
            if stats.done_at is not None or time.monotonic() > deadline:
                return stats


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    event_id: str
    routing_key: str
    body: bytes


def call_ended_envelopes(count: int, seed: int) -> list[Envelope]:
    """Envelopes as a worker publishes them for Roistat call ends of about 1 KB."""
    payloads = Payloads(seed)
    tz = ZoneInfo("Europe/Moscow")
    now = datetime.now(UTC)
    envelopes = []
    for index in range(count):
        document = payloads.end(payloads.start(index))
        call = enrich(CallEndPayload.model_validate(document), region="RU", tz=tz)
        call = call.model_copy(
            update={
                "is_repeat_caller": False,
                "previous_calls": 0,
                "revision": 2,
                "start_received_at": now - timedelta(seconds=90),
                "end_received_at": now,
            }
        )
        event = CallEvent(
            event_id=f"{PROJECT}:{call.call_id}:end",
            type="call.ended",
            occurred_at=call.called_at,
            received_at=now,
            project=PROJECT,
            call=call,
            raw=document,
        )
        routing_key = event_routing_key(event.type, call.outcome)
        envelopes.append(Envelope(event.event_id, routing_key, encode(event.to_json_dict())))
    return envelopes


async def preload(
    connection: AbstractConnection, topology: Topology, envelopes: Sequence[Envelope]
) -> None:
    """Publish to `{ns}.events` as the workers do (persistent, confirmed), then wait for the
    sink's queue to hold them all."""
    queue = topology.sink_queue(SINK_NAME)
    async with connection.channel(publisher_confirms=True) as channel:
        await (await channel.get_queue(queue, ensure=False)).purge()
        exchange = await channel.get_exchange(topology.events_exchange, ensure=False)
        for first in range(0, len(envelopes), PUBLISH_WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            one.body,
                            message_id=one.event_id,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        one.routing_key,
                    )
                    for one in envelopes[first : first + PUBLISH_WINDOW]
                )
            )
    await settled_depth(connection, queue, len(envelopes))


async def settled_depth(connection: AbstractConnection, queue: str, expected: int) -> int:
    """The queue's depth; re-read for up to 5 s while it differs from `expected`."""
    deadline = time.monotonic() + 5.0
    while True:
        depth, _ = await queue_depth(connection, queue)
        if depth == expected or time.monotonic() > deadline:
            return depth
        await asyncio.sleep(0.05)


# --- the three variants --------------------------------------------------------------------


@dataclass
class VariantRun:
    variant: str
    concurrency: int
    events: int
    round: int = 1
    started_at: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time, from the start to the last event
    stats: ReceiverStats | None = None
    latencies_s: list[float] = field(default_factory=list)
    left_in_queue: int | None = None  # None: no broker
    problems: list[str] = field(default_factory=list)
    _cpu_at_start: float = 0.0

    def begin(self) -> None:
        self.started_at = time.monotonic()
        self._cpu_at_start = time.process_time()

    def finish(self, stats: ReceiverStats) -> None:
        self.cpu_s = time.process_time() - self._cpu_at_start
        self.stats = stats

    @property
    def rate(self) -> float | None:
        """Deliveries/s: N over the time from the start to the N-th event at the receiver."""
        if self.stats is None or self.stats.done_at is None:
            return None
        return self.events / (self.stats.done_at - self.started_at)

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s / self.events * 1e6


async def post_signed(
    session: aiohttp.ClientSession, url: str, signer: Webhook, event_id: str, body: bytes
) -> tuple[int, float]:
    """Sign per the Standard Webhooks spec and POST; the status and the request's seconds."""
    now = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(event_id, now, body.decode()),
    }
    started = time.monotonic()
    async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
        await response.read()
        return response.status, time.monotonic() - started


class SinkLatencies(logging.Handler):
    """The request times `WebhookSink` logs at INFO, taken from the records' arguments."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.samples_s: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if isinstance(args, tuple) and len(args) == 4 and isinstance(args[3], float):
            self.samples_s.append(args[3] / 1000.0)


async def run_callpipe(
    one: VariantRun,
    settings: Settings,
    config: WebhookSinkConfig,
    receiver: ReceiverClient,
    procs: Subprocesses,
    timeout_s: float,
) -> None:
    latencies = SinkLatencies()
    logger = logging.getLogger("sinks.webhook")
    logger.addHandler(latencies)
    stop = asyncio.Event()
    one.begin()
    task = asyncio.create_task(run_sinks(settings, [config], stop), name="run_sinks")
    try:
        one.finish(await receiver.wait_done(timeout_s, procs, alongside=task))
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=settings.shutdown_timeout_s + 10)
        logger.removeHandler(latencies)
    one.latencies_s = latencies.samples_s


async def run_peer(
    one: VariantRun,
    amqp_url: str,
    queue_name: str,
    secret: str,
    receiver: ReceiverClient,
    procs: Subprocesses,
    timeout_s: float,
) -> None:
    """What a user would write: prefetch C, sign, POST on one shared session, ack after a 2xx."""
    one.begin()
    signer = Webhook(secret)
    acked = 0
    all_acked = asyncio.Event()
    connection = await aio_pika.connect_robust(amqp_url)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=one.concurrency),
        timeout=aiohttp.ClientTimeout(total=10),
    )
    async with connection, session:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=one.concurrency)
        queue = await channel.get_queue(queue_name, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal acked
            try:
                status, seconds = await post_signed(
                    session, receiver.hook_url, signer, message.message_id or "", message.body
                )
            except (aiohttp.ClientError, TimeoutError):
                status, seconds = 0, 0.0
            if not 200 <= status < 300:
                await message.nack(requeue=True)
                return
            one.latencies_s.append(seconds)
            await message.ack()
            acked += 1
            if acked >= one.events:
                all_acked.set()

        tag = await queue.consume(on_message)
        one.finish(await receiver.wait_done(timeout_s, procs))
        # Cancelling before the last acks would put those deliveries back in the queue.
        try:
            await asyncio.wait_for(all_acked.wait(), timeout=10)
        except TimeoutError:
            one.problems.append(f"only {acked} acks")
        await queue.cancel(tag)


async def run_ceiling(
    one: VariantRun,
    envelopes: Sequence[Envelope],
    secret: str,
    receiver: ReceiverClient,
    procs: Subprocesses,
    timeout_s: float,
) -> None:
    """The same signing and POSTs at the same concurrency, without a broker."""
    one.begin()
    signer = Webhook(secret)
    pending = iter(envelopes)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=one.concurrency),
        timeout=aiohttp.ClientTimeout(total=10),
    )

    async def client() -> None:
        for envelope in pending:
            status, seconds = await post_signed(
                session, receiver.hook_url, signer, envelope.event_id, envelope.body
            )
            if 200 <= status < 300:
                one.latencies_s.append(seconds)

    async with session:
        await asyncio.gather(*(client() for _ in range(one.concurrency)))
    one.finish(await receiver.wait_done(timeout_s, procs))


# --- report --------------------------------------------------------------------------------


def check(one: VariantRun) -> None:
    """Every event arrived, signed, exactly once, and (through a broker) was acked."""
    stats = one.stats
    if stats is None or stats.done_at is None:
        got = 0 if stats is None else stats.distinct
        one.problems.append(f"only {got} of {one.events} events arrived")
        return
    if stats.requests != stats.distinct:
        one.problems.append(f"{stats.requests - stats.distinct} duplicate requests")
    if stats.bad_signatures or not stats.verified:
        one.problems.append(f"signatures: {stats.verified} good, {stats.bad_signatures} bad")
    if one.left_in_queue:
        one.problems.append(f"{one.left_in_queue} messages left in the sink queue")


def report(runs: Sequence[VariantRun], rounds: int) -> None:
    headers = ["variant", "C", "events", "1st POST ms", "deliveries/s", "steady/s"]
    headers += ["p50 ms", "p99 ms", "CPU µs/ev", "rcv µs/ev", "sigs ok"]
    rows = []
    for one in runs:
        stats = one.stats
        spread = Spread.of(one.latencies_s)
        rate = steady = first = receiver_cpu = "-"
        if stats is not None and stats.done_at is not None and stats.first_at is not None:
            rate = f"{one.rate:.0f}"
            if stats.done_at > stats.first_at:
                steady = f"{(one.events - 1) / (stats.done_at - stats.first_at):.0f}"
            first = f"{(stats.first_at - one.started_at) * 1000:.0f}"
            if stats.cpu_s is not None:
                receiver_cpu = f"{stats.cpu_s / one.events * 1e6:.0f}"
        rows.append(
            [
                one.variant if rounds == 1 else f"{one.variant} #{one.round}",
                str(one.concurrency),
                str(one.events if stats is None else stats.distinct),
                first,
                rate,
                steady,
                fmt_ms(spread.p50 if spread else None),
                fmt_ms(spread.p99 if spread else None),
                f"{one.cpu_us_per_event:.0f}",
                receiver_cpu,
                "-" if stats is None else str(stats.verified),
            ]
        )
    print_table(headers, rows)
    if rounds == 1:
        return
    print()
    print(f"median of {rounds} rounds")
    rows = []
    for variant in VARIANTS:
        for concurrency in sorted({one.concurrency for one in runs}):
            same = [one for one in runs if (one.variant, one.concurrency) == (variant, concurrency)]
            if not same:
                continue
            rates = [one.rate for one in same if one.rate is not None]
            rows.append(
                [
                    variant,
                    str(concurrency),
                    f"{statistics.median(rates):.0f}" if rates else "-",
                    f"{min(rates):.0f}..{max(rates):.0f}" if rates else "-",
                    f"{statistics.median(one.cpu_us_per_event for one in same):.0f}",
                ]
            )
    print_table(["variant", "C", "deliveries/s", "range", "CPU µs/ev"], rows)


# --- the run -------------------------------------------------------------------------------


async def measure(
    one: VariantRun,
    args: argparse.Namespace,
    connection: AbstractConnection,
    settings: Settings,
    config: WebhookSinkConfig,
    envelopes: Sequence[Envelope],
    receiver: ReceiverClient,
    procs: Subprocesses,
) -> None:
    """Preload the sink's queue (unless the variant needs no broker), run, check."""
    topology = settings.topology
    queue = topology.sink_queue(SINK_NAME)
    secret = config.secret.get_secret_value()
    if one.variant != "client ceiling":
        await preload(connection, topology, envelopes)
    await receiver.reset(len(envelopes))
    if one.variant == "callpipe":
        sink = config.model_copy(update={"max_in_flight": one.concurrency})
        await run_callpipe(one, settings, sink, receiver, procs, args.timeout)
    elif one.variant == "aio-pika peer":
        await run_peer(one, args.amqp_url, queue, secret, receiver, procs, args.timeout)
    else:
        await run_ceiling(one, envelopes, secret, receiver, procs, args.timeout)
    if one.variant != "client ceiling":
        one.left_in_queue = await settled_depth(connection, queue, 0)
    check(one)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def setup_logging(level: str, procs: Subprocesses) -> None:
    """callpipe's own log lines (one per delivery at INFO), to a file rather than the terminal."""
    logging.basicConfig(
        filename=procs.log_dir / "bench.log", level=level, format=LOG_FORMAT, force=True
    )
    quieter = max(logging.WARNING, logging.getLevelNamesMapping()[level])
    logging.getLogger("aiormq").setLevel(quieter)
    logging.getLogger("aio_pika").setLevel(quieter)


async def bench(args: argparse.Namespace, procs: Subprocesses) -> int:
    cancel_on_sigterm()
    setup_logging(args.log_level, procs)
    say: Callable[[str], None] = (lambda _: None) if args.quiet else print
    namespace = new_namespace()
    topology = Topology(namespace)
    secret = new_secret()
    port = free_port()
    config = WebhookSinkConfig.model_validate(
        {"name": SINK_NAME, "url": f"http://{LOCALHOST}:{port}/hook", "secret": secret}
    )
    sink_queues = [topology.sink_queue(SINK_NAME)]
    sink_queues += [delay_queue(topology, SINK_NAME, d) for d in set(config.retry_delays_s)]
    settings = Settings(namespace=namespace, amqp_url=args.amqp_url, log_level=args.log_level)
    connection = await aio_pika.connect(args.amqp_url)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        argv = [sys.executable, __file__, "receive", "--port", str(port)]
        argv += ["--verify-every", str(args.verify_every)]
        procs.start("receiver", argv, {**os.environ, SECRET_ENV: secret})
        async with connection.channel() as channel:
            await declare_topology(channel, topology)
            await declare_sink(channel, topology, config)
        started = time.monotonic()
        envelopes = call_ended_envelopes(args.events, args.seed)
        sizes = sorted(len(one.body) for one in envelopes)
        print(f"sink throughput: {topology.events_exchange} -> one webhook sink -> receiver")
        built_s = time.monotonic() - started
        print(f"  events: {args.events} call.ended envelopes per variant, built in {built_s:.1f}s")
        print(f"    median {sizes[len(sizes) // 2]} bytes ({sizes[0]}..{sizes[-1]})")
        levels = ", ".join(str(c) for c in args.concurrency)
        print(f"  concurrency C (max_in_flight = prefetch = connections): {levels}")
        print(f"  receiver checks the signature of the first and every {args.verify_every}th")
        print(f"  callpipe log level: {args.log_level} (to a file)")
        print(f"  namespace: {namespace}, RabbitMQ {await broker_version(connection)}")
        print(f"  {machine_line()}", flush=True)
        await wait_http_ok(f"http://{LOCALHOST}:{port}/ready", procs, what="receiver")
        receiver = ReceiverClient(f"http://{LOCALHOST}:{port}", session)

        warmup = VariantRun("warm-up", 8, min(200, len(envelopes)))
        await receiver.reset(warmup.events)
        await run_ceiling(warmup, envelopes[: warmup.events], secret, receiver, procs, 30)

        runs: list[VariantRun] = []
        for round_ in range(1, args.rounds + 1):
            for concurrency in args.concurrency:
                for variant in VARIANTS:
                    one = VariantRun(variant, concurrency, len(envelopes), round_)
                    say(f"  round {round_}, C={concurrency}: {variant} ...")
                    await measure(
                        one, args, connection, settings, config, envelopes, receiver, procs
                    )
                    runs.append(one)
        dead, _ = await queue_depth(connection, topology.dead_queue)
        print()
        report(runs, args.rounds)
        print()
        print(f"{topology.dead_queue}: {dead} messages")
        failed = [one for one in runs if one.problems]
        for one in failed:
            print(f"{one.variant} #{one.round} C={one.concurrency}: {'; '.join(one.problems)}")
        if failed or dead:
            procs.failed = True
        return 1 if failed or dead else 0
    finally:
        procs.stop_all()
        await session.close()
        await connection.close()
        await remove_namespace(args.amqp_url, namespace, extra_queues=sink_queues)


def concurrency_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(not 1 <= value <= 256 for value in values):
        raise argparse.ArgumentTypeError("a list like 1,8,32 of values within 1..256")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=5000, help="per variant (default 5000)")
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=[8],
        help="requests in flight, or a list such as 1,8,32: a row each (default 8)",
    )
    parser.add_argument(
        "--verify-every", type=int, default=50, help="receiver checks every n-th signature (50)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="callpipe's (default INFO, as in production; DEBUG adds a line per delivery, "
        "from which callpipe's p50/p99 are read)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved repetitions; medians printed (1)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per variant")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.events <= 100_000:
        parser.error("--events must be within 1..100000")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be within 1..20")
    if not 1 <= args.verify_every <= 100_000:
        parser.error("--verify-every must be within 1..100000")
    require_local(args.amqp_url, "--amqp-url")
    return args


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["receive"]:
        server = argparse.ArgumentParser(prog="sink_throughput.py receive")
        server.add_argument("--port", type=int, required=True)
        server.add_argument("--verify-every", type=int, default=50)
        opts = server.parse_args(argv[1:])
        return run(serve_receiver(opts.port, opts.verify_every))
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
