"""The faults, on the machine's real RabbitMQ and PostgreSQL and on callpipe's own
processes, and the scenarios that run them with what each one's crash window allows."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from callpipe_testing import wait_for
from fault_checker import NO_ANSWER, OK, REFUSED, SPOOLED, Answer
from fault_load import PROJECT, TOKEN, Load, call_body
from fault_rig import Rig
from service_control import (
    broker_alarms,
    broker_disk_free,
    journal_limits,
    pg_ctlcluster,
    rabbitmqctl,
    restore_services,
    set_disk_free_limit,
    set_watermark,
)

Fault = Callable[[Rig, Load], Coroutine[Any, Any, None]]

# A broker fault is in effect by this share of the load (the load waits for it if need be),
# so that the rest goes out under the fault.
ONSET_BY = 0.6


# ---- the faults -------------------------------------------------------------------------------


async def ctl(*args: str) -> str:
    return await asyncio.to_thread(rabbitmqctl, *args)


async def some_spooled(load: Load) -> None:
    """The fault took effect at the edge: the ingress answered some webhooks from its spool."""

    async def spooled() -> bool:
        return any(answer.outcome == SPOOLED for answer in load.answers)

    try:
        await wait_for(spooled, seconds=30, what="webhooks answered from the spool")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {load.progress()}") from None


async def mend(rig: Rig) -> None:
    await asyncio.to_thread(restore_services, rig.database_url)


async def rabbit_stop_app(rig: Rig, load: Load) -> None:
    await load.reached(0.2)
    try:
        async with load.held_at(ONSET_BY):
            await ctl("stop_app")
        await some_spooled(load)
        await load.reached(0.7)
    finally:
        await ctl("start_app")
        await mend(rig)


async def rabbit_close_all_connections(rig: Rig, load: Load) -> None:
    for share in (0.3, 0.65):
        await load.reached(share)
        await ctl("close_all_connections", "test")


async def _under_alarm(
    rig: Rig, load: Load, raise_alarm: Callable[[], None], during: Callable[[], Awaitable[None]]
) -> None:
    """Raise a resource alarm, run `during`, then put the limit back (even on failure)."""
    try:
        async with load.held_at(ONSET_BY):
            await asyncio.to_thread(raise_alarm)

            async def alarmed() -> bool:
                return bool(await asyncio.to_thread(broker_alarms))

            await wait_for(alarmed, seconds=30, what="the broker's alarm")
        await some_spooled(load)
        await during()
    finally:
        await mend(rig)


def memory_alarm() -> None:
    set_watermark(["0"])


def disk_alarm() -> None:
    set_disk_free_limit([str(broker_disk_free() * 2 + 10**9)])


async def rabbit_memory_alarm(rig: Rig, load: Load) -> None:
    await asyncio.to_thread(journal_limits)  # before the change: the safety net needs it
    await load.reached(0.15)
    await _under_alarm(rig, load, memory_alarm, lambda: load.reached(0.8))


async def rabbit_disk_alarm_with_backlog(rig: Rig, load: Load) -> None:
    """The workers are paused (SIGSTOP) while a backlog builds, and resume under the alarm:
    their event publishes block, time out and are retried on a blocked connection."""
    await asyncio.to_thread(journal_limits)
    for worker in rig.workers.values():
        worker.current.send(signal.SIGSTOP)
    try:
        await load.reached(0.15)

        async def resume_then_wait() -> None:
            for worker in rig.workers.values():
                worker.current.send(signal.SIGCONT)
            await load.reached(0.8)

            async def a_publish_timed_out() -> bool:
                return any("event not confirmed" in w.log() for w in rig.workers.values())

            await wait_for(a_publish_timed_out, seconds=30, what="a worker's publish to time out")

        await _under_alarm(rig, load, disk_alarm, resume_then_wait)
    finally:
        for worker in rig.workers.values():
            worker.current.send(signal.SIGCONT)


async def postgres_restart_immediate(rig: Rig, load: Load) -> None:
    await load.reached(0.3)
    try:
        await asyncio.to_thread(pg_ctlcluster, rig.database_url, "restart", "-m", "immediate")
    finally:
        await mend(rig)


async def worker_sigkill(rig: Rig, load: Load) -> None:
    await load.reached(0.4)
    rig.workers["end"].kill()


async def ingress_sigkill_with_spool(rig: Rig, load: Load) -> None:
    """Cut the ingresses off the broker (memory alarm), SIGKILL one whose spool holds
    webhooks, restart it on the same spool while the alarm holds, then end the alarm."""
    a = rig.ingresses[0]

    async def kill_and_restart() -> None:
        async def spool_filled() -> bool:
            return await a.spooled(rig.session) >= 20

        await wait_for(spool_filled, seconds=30, what="ingress a's spool to fill")
        rig.facts["spool at kill"] = await a.spooled(rig.session)
        in_flight, issued = load.in_flight, load.issued
        a.process.send(signal.SIGKILL)
        a.exits.append(await a.process.wait())
        # A webhook sent while the process was dying got no answer either: its connection
        # was accepted by the kernel, then reset (seen: "Can not write request body").
        rig.facts["in flight at kill"] = in_flight + (load.issued - issued)
        await a.start(rig.session, connected=False)
        if "from before the restart" not in a.log():
            rig.problems.append("the restarted ingress did not report the spool it found")
        await load.reached(0.75)

    await asyncio.to_thread(journal_limits)
    await load.reached(0.1)
    await _under_alarm(rig, load, memory_alarm, kill_and_restart)


async def ingress_sigterm(rig: Rig, load: Load) -> None:
    """SIGTERM under load; one webhook's connection is open, its request not yet sent (a
    client whose bytes are still on the way), when the signal arrives."""
    a = rig.ingresses[0]
    await load.reached(0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    a.process.send(signal.SIGTERM)
    sent = time.monotonic()

    async def stopping() -> bool:
        try:
            async with rig.session.get(f"{a.url}/readyz") as response:
                return response.status != 200
        except aiohttp.ClientError:
            return True

    await wait_for(stopping, seconds=30, what="ingress a to start stopping")
    load.answers.append(await late_request(reader, writer, "on-the-way", 0, "start"))
    code = await asyncio.wait_for(a.process.wait(), timeout=30)
    rig.facts["exit after SIGTERM s"] = round(time.monotonic() - sent, 2)
    a.exits.append(code)
    if code != 0:
        rig.problems.append(f"ingress a exited {code} on SIGTERM, not 0")
    await a.start(rig.session)


async def late_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, call_id: str, n: int, kind: str
) -> Answer:
    """Send one webhook on a connection opened earlier, and note what came back."""
    event_id = f"{PROJECT}:{call_id}:{kind}"
    body = call_body(call_id, n, kind)
    head = (
        f"POST /roistat/{TOKEN}/call-{kind} HTTP/1.1\r\nHost: ingress\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    started = time.monotonic()
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)
    except (OSError, TimeoutError) as exc:
        response = f"{type(exc).__name__}: {exc}".encode()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status = response.split(b" ", 2)[1] if response.startswith(b"HTTP/1.1 ") else b""
    outcome = NO_ANSWER if not status else OK if status == b"200" else REFUSED
    if outcome == OK and re.search(rb'"spooled":\s*true', response):
        outcome = SPOOLED
    detail = f"request on a connection opened before SIGTERM: {response[:120]!r}"
    return Answer(event_id, call_id, kind, outcome, detail, time.monotonic() - started)


# ---- the scenarios ----------------------------------------------------------------------------

# Which events may reach {ns}.events twice (always with the same event id), per scenario.
NONE = "none"  # nothing crashed between an event's confirm and its mark
FAILPOINT = "failpoint ids"  # exactly the events a failpoint killed after their confirm
RETRIED = "failed attempts"  # only events the outbox relay logged as not confirmed (a lost
# confirm) or not marked (the database lost after the confirm), once per such line
KILLED_WORKER = "killed worker"  # only the SIGKILLed worker's kind, at most its prefetch


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault | None
    duplicates: str = RETRIED
    ingresses: int = 1
    failpoint: str | None = None  # CALLPIPE_FAILPOINT of both workers, for `kills` lives each
    kills: int = 0
    no_answer: bool = False  # webhooks in flight to a SIGKILLed ingress get no answer
    shared: bool = True  # stops, alarms or restarts the machine's RabbitMQ or PostgreSQL

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


SCENARIOS = [
    Scenario("rabbitmq stop_app/start_app", rabbit_stop_app),
    Scenario("rabbitmq close_all_connections x2", rabbit_close_all_connections),
    Scenario("rabbitmq memory alarm", rabbit_memory_alarm),
    Scenario("rabbitmq disk alarm, workers with a backlog", rabbit_disk_alarm_with_backlog),
    Scenario("postgresql restart -m immediate", postgres_restart_immediate),
    Scenario("worker end SIGKILL mid-load", worker_sigkill, duplicates=KILLED_WORKER, shared=False),
    Scenario(
        "worker SIGKILL after confirm, before mark",
        None,
        duplicates=FAILPOINT,
        failpoint="outbox.after_confirm:40",
        kills=2,
        shared=False,
    ),
    Scenario(
        "worker SIGKILL before commit",
        None,
        duplicates=KILLED_WORKER,  # nothing is published before the commit; the relay may
        # be between a confirm and its mark (of an earlier batch) at the kill
        failpoint="store.before_commit:40",
        kills=2,
        shared=False,
    ),
    Scenario(
        "worker SIGKILL after commit, before ack",
        None,
        duplicates=KILLED_WORKER,
        failpoint="consumer.before_ack:40",
        kills=2,
        shared=False,
    ),
    Scenario(
        "ingress SIGKILL with a full spool",
        ingress_sigkill_with_spool,
        # The memory alarm blocks the workers' event publishes too when they still work off
        # a backlog at its onset (a busy machine): those the relay retries may come twice.
        duplicates=RETRIED,
        ingresses=2,
        no_answer=True,
    ),
    Scenario(
        "ingress SIGTERM under load", ingress_sigterm, duplicates=NONE, ingresses=2, shared=False
    ),
]
