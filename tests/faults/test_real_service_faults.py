"""Faults on the machine's real RabbitMQ and PostgreSQL, checked as Jepsen checks a queue.

Each scenario runs `callpipe ingress` and both workers as processes in a namespace of its
own, sends a paced load of call starts and ends with a ledger of every answer, breaks
something mid-load, mends it, waits for the drain, and classifies every id. The goal of every
scenario: nothing refused, nothing lost, nothing unexpected; an event twice only inside the
scenario's crash window, always with the same event id. The table is printed at the end of
the run. Every changed setting is put back, even when a scenario fails (see
`service_control`). Run alone: `.venv/bin/pytest tests/faults/test_real_service_faults.py`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import re
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from callpipe_testing import wait_for
from conftest import Services
from fault_checker import SPOOLED, Verdict, classify, error_row, format_table, table_row
from fault_rig import Load, Rig, kill_leftovers
from service_control import (
    OUTAGES,
    broker_alarms,
    broker_disk_free,
    journal_limits,
    other_test_runs,
    pg_ctlcluster,
    rabbitmqctl,
    restore_exclusively,
    restore_services,
    set_disk_free_limit,
    set_watermark,
    why_not_controllable,
)

RATE = 150.0  # webhooks per second
CALLS = 400  # calls per scenario: a start and an end each, so 800 webhooks in 5.3 s
DRAIN_WITHIN_S = 90.0

Fault = Callable[[Rig, Load], Coroutine[Any, Any, None]]


# ---- the faults -------------------------------------------------------------------------------


async def ctl(*args: str) -> str:
    return await asyncio.to_thread(rabbitmqctl, *args)


async def some_spooled(load: Load) -> None:
    """The fault took effect at the edge: the ingress answered some webhooks from its spool."""

    async def spooled() -> bool:
        return any(answer.outcome == SPOOLED for answer in load.answers)

    await wait_for(spooled, seconds=30, what="webhooks answered from the spool")


async def mend(rig: Rig) -> None:
    await asyncio.to_thread(restore_services, rig.database_url)


async def rabbit_stop_app(rig: Rig, load: Load) -> None:
    await load.reached(0.2)
    try:
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
        rig.facts["in flight at kill"] = load.in_flight
        a.process.send(signal.SIGKILL)
        a.exits.append(await a.process.wait())
        await a.start(rig.session, connected=False)
        if "from before the restart" not in a.log():
            rig.problems.append("the restarted ingress did not report the spool it found")
        await load.reached(0.75)

    await asyncio.to_thread(journal_limits)
    await load.reached(0.1)
    await _under_alarm(rig, load, memory_alarm, kill_and_restart)


async def ingress_sigterm(rig: Rig, load: Load) -> None:
    a = rig.ingresses[0]
    await load.reached(0.4)
    a.process.send(signal.SIGTERM)
    code = await asyncio.wait_for(a.process.wait(), timeout=30)
    a.exits.append(code)
    if code != 0:
        rig.problems.append(f"ingress a exited {code} on SIGTERM, not 0")
    await a.start(rig.session)


# ---- the scenarios ----------------------------------------------------------------------------

# Which events may reach {ns}.events twice (always with the same event id), per scenario.
NONE = "none"  # nothing crashed between an event's store and its mark
FAILPOINT = "failpoint ids"  # exactly the deliveries a failpoint killed after the confirm
RETRIED = "failed attempts"  # only deliveries whose worker logged a failed attempt (a lost
# confirm, or a commit that failed after the broker stored the event), once per failure
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
        failpoint="store.after_confirm:40",
        kills=2,
        shared=False,
    ),
    Scenario(
        "worker SIGKILL before commit",
        None,
        duplicates=FAILPOINT,
        failpoint="store.before_commit:40",
        kills=2,
        shared=False,
    ),
    Scenario(
        "worker SIGKILL after commit, before ack",
        None,
        duplicates=NONE,
        failpoint="consumer.before_ack:40",
        kills=2,
        shared=False,
    ),
    Scenario(
        "ingress SIGKILL with a full spool",
        ingress_sigkill_with_spool,
        duplicates=NONE,
        ingresses=2,
        no_answer=True,
    ),
    Scenario(
        "ingress SIGTERM under load", ingress_sigterm, duplicates=NONE, ingresses=2, shared=False
    ),
]

# Rows of the table printed at the end of the run.
RESULTS: list[tuple[str, ...]] = []
NOTES: list[str] = []


LEGEND = [
    "spooled: answered 200 from the ingress's spool; no answer: in flight to an ingress that died",
    "dup events: event ids seen more than once on {ns}.events (xN: the most copies of one id)",
    f"dups allowed: {NONE}; {FAILPOINT} (exactly the deliveries killed after their event's "
    f"confirm, once more each); {RETRIED} (only deliveries whose worker logged a failed "
    "attempt after the broker had the event, once per failure); "
    f"{KILLED_WORKER} (only the SIGKILLed worker's deliveries in flight)",
]


class FaultTable:
    """Prints the scenarios' table in the terminal summary, where CI output shows it."""

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not RESULTS and not NOTES:
            return
        terminalreporter.write_sep("=", "faults on the real RabbitMQ and PostgreSQL")
        for line in format_table(RESULTS):
            terminalreporter.write_line(line)
        for line in LEGEND:
            terminalreporter.write_line(line)
        for note in NOTES:
            terminalreporter.write_line(note)


def _leave_nothing_behind(database_url: str) -> None:
    """At exit, even after a timeout cut a scenario short: no process of ours left running,
    no setting left changed, no service left stopped."""
    kill_leftovers()
    with contextlib.suppress(Exception):
        restore_exclusively(database_url)


@pytest.fixture(scope="session")
def real_services(services: Services, request: pytest.FixtureRequest) -> Iterator[Services]:
    """The machine's own services, healthy, with the safety net that keeps them so."""
    plugins = request.config.pluginmanager
    if not plugins.has_plugin("callpipe-fault-table"):
        plugins.register(FaultTable(), "callpipe-fault-table")
    reason = why_not_controllable(services.amqp_url, services.database_url)
    if reason is not None:
        NOTES.append(f"skipped: these scenarios need the machine's own services ({reason})")
        pytest.skip(f"faults on the real services: {reason}")
    atexit.register(_leave_nothing_behind, services.database_url)
    restore_exclusively(services.database_url)  # what a crashed earlier run may have left
    try:
        yield services
    finally:
        kill_leftovers()
        restore_exclusively(services.database_url)


async def shared_clients_recovered(amqp: AbstractRobustConnection, db: asyncpg.Pool) -> None:
    """The session's own connections (other tests use them) are usable again."""

    async def reconnected() -> bool:
        return amqp.connected.is_set()

    await wait_for(reconnected, seconds=60, what="the session's broker connection back")
    await db.expire_connections()


def logged_ids(rig: Rig, pattern: str) -> Counter[str]:
    """Event ids the workers' logs name in lines matching `pattern` (one group: the id)."""
    found: Counter[str] = Counter()
    for worker in rig.workers.values():
        found.update(re.findall(pattern, worker.log(), re.MULTILINE))
    return found


def duplicate_problems(scenario: Scenario, duplicated: dict[str, int], rig: Rig) -> list[str]:
    """Events seen twice that the scenario's crash window does not explain."""
    killed = logged_ids(rig, r"^failpoint \S+: killing process \d+ at (\S+)$")
    failed = logged_ids(rig, r"WARNING workers\.consumer: delivery (\S+) failed \(attempt")
    if scenario.duplicates == NONE and duplicated:
        return [f"events twice outside any crash window: {sorted(duplicated)[:10]}"]
    if scenario.duplicates == FAILPOINT and (
        set(duplicated) != set(killed) or set(duplicated.values()) - {2}
    ):
        return [f"events twice {duplicated} are not once more each killed delivery {killed}"]
    if scenario.duplicates == RETRIED:
        unexplained = {
            event_id: copies
            for event_id, copies in duplicated.items()
            if copies > 1 + failed[event_id]
        }
        if unexplained:
            return [f"events twice without a failed attempt each: {unexplained}"]
    if scenario.duplicates == KILLED_WORKER:
        kinds = {event_id.rsplit(":", 1)[1] for event_id in duplicated}
        if kinds - {"end"} or len(duplicated) > rig.prefetch or set(duplicated.values()) - {2}:
            return [f"events twice beyond the killed worker's {rig.prefetch}: {duplicated}"]
    return []


def judge(scenario: Scenario, verdict: Verdict, rig: Rig) -> list[str]:
    """What is wrong with this run, judged by the scenario's own crash window."""
    problems = list(rig.problems)
    if verdict.refused:
        problems.append(f"{verdict.refused} refused")
    if verdict.lost:
        problems.append(f"{len(verdict.lost)} lost: {verdict.lost[:10]}")
    if verdict.unexpected:
        problems.append(f"{len(verdict.unexpected)} unexpected: {verdict.unexpected[:10]}")
    in_flight_at_kill = rig.facts.get("in flight at kill", 0) if scenario.no_answer else 0
    if verdict.no_answer > in_flight_at_kill:
        problems.append(
            f"{verdict.no_answer} webhooks got no answer; "
            f"{in_flight_at_kill} were in flight to a killed ingress"
        )
    problems += duplicate_problems(scenario, verdict.duplicated, rig)
    for worker in rig.workers.values():
        kills = scenario.kills if scenario.failpoint else 0
        if scenario.duplicates == KILLED_WORKER and worker.kind == "end":
            kills = 1
        if worker.exits.count(-signal.SIGKILL) != kills or worker.exits[-1:] != [0]:
            problems.append(f"worker {worker.kind} exited {worker.exits}, expected {kills} kills")
    for ingress in rig.ingresses:
        if ingress.exits[-1:] != [0]:
            problems.append(f"ingress {ingress.name} exited {ingress.exits}")
    if scenario.failpoint and scenario.failpoint.startswith("consumer.before_ack"):
        redelivered = logged_ids(rig, r"call (\S+) .*: duplicate$")
        for event_id in logged_ids(rig, r"^failpoint \S+: killing process \d+ at (\S+)$"):
            if not redelivered[event_id]:
                problems.append(f"{event_id}, killed before its ack, was not seen again")
    return problems


async def run_scenario(
    scenario: Scenario,
    services: Services,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    log_dir: Path,
) -> tuple[Verdict, Rig]:
    """Start the rig, load it through the fault, mend, drain, stop, and check."""
    rig = Rig(
        services.amqp_url,
        services.database_url,
        log_dir,
        ingresses=scenario.ingresses,
        failpoint=scenario.failpoint,
        kills=scenario.kills,
    )
    load = Load([ingress.url for ingress in rig.ingresses], CALLS, RATE)
    try:
        await rig.start()
        faulting = asyncio.create_task(scenario.fault(rig, load)) if scenario.fault else None
        try:
            await load.run(rig.session)
            if faulting is not None:
                await faulting
        finally:
            if faulting is not None and not faulting.done():
                faulting.cancel()
                with contextlib.suppress(BaseException):
                    await faulting
            await asyncio.to_thread(restore_services, services.database_url)
            await shared_clients_recovered(amqp, db)

        async def drained() -> bool:
            return await rig.drained(load.answers)

        try:
            await wait_for(drained, seconds=DRAIN_WITHIN_S, what="the drain")
        except AssertionError as exc:
            rig.problems.append(str(exc))  # classified below: the table shows what is missing
        await rig.stop()
        return classify(load.answers, await rig.stored()), rig
    finally:
        await rig.stop()
        await rig.remove()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.slug for s in SCENARIOS])
async def test_nothing_refused_nothing_lost(
    scenario: Scenario,
    real_services: Services,
    amqp: AbstractRobustConnection,
    db: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    if scenario.shared:
        # Another test run on this machine uses the same services: an outage would break it.
        if others := await asyncio.to_thread(other_test_runs):
            RESULTS.append(error_row(scenario.name, "SKIPPED: another test run"))
            pytest.skip(f"other test runs use this machine's services: {', '.join(others)}")
        await asyncio.to_thread(OUTAGES.acquire)
    try:
        verdict, rig = await run_scenario(scenario, real_services, amqp, db, tmp_path)
    except BaseException as exc:
        RESULTS.append(error_row(scenario.name, f"ERROR {type(exc).__name__}"))
        raise
    finally:
        OUTAGES.release()
    problems = judge(scenario, verdict, rig)
    result = "ok" if not problems else "FAIL"
    RESULTS.append(table_row(scenario.name, verdict, scenario.duplicates, result))
    assert not problems, "\n".join([*problems, rig.log_tails()])
