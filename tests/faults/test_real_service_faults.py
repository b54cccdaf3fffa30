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
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from callpipe_testing import wait_for
from conftest import Services
from fault_checker import Verdict, classify, error_row, format_table, table_row
from fault_load import Load
from fault_processes import kill_leftovers
from fault_rig import Rig
from fault_scenarios import (
    FAILPOINT,
    KILLED_WORKER,
    NONE,
    RETRIED,
    SCENARIOS,
    Scenario,
    worker_sigkill,
)
from service_control import (
    OUTAGES,
    other_test_runs,
    restore_exclusively,
    why_not_controllable,
)

RATE = 150.0  # webhooks per second
CALLS = 400  # calls per scenario: a start and an end each, so 800 webhooks in 5.3 s
DRAIN_WITHIN_S = 90.0

# Rows of the table printed at the end of the run.
RESULTS: list[tuple[str, ...]] = []
NOTES: list[str] = []


LEGEND = [
    "spooled: answered 200 from the ingress's spool; no answer: in flight to an ingress that died",
    "dup events: event ids seen more than once on {ns}.events (xN: the most copies of one id)",
    f"dups allowed: {NONE}; {FAILPOINT} (exactly the events killed after their confirm, "
    f"once more each); {RETRIED} (only events the outbox relay logged as not confirmed or "
    "not marked, once per line); "
    f"{KILLED_WORKER} (only events of a SIGKILLed worker's kind, at most one relay batch "
    "per kill: confirmed, not yet marked)",
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
    """Event ids the workers' logs name in lines matching `pattern` (one group: the id, or
    several ids separated by commas)."""
    found: Counter[str] = Counter()
    for worker in rig.workers.values():
        for ids in re.findall(pattern, worker.log(), re.MULTILINE):
            found.update(ids.split(","))
    return found


def duplicate_problems(scenario: Scenario, duplicated: dict[str, int], rig: Rig) -> list[str]:
    """Events seen twice that the scenario's crash window does not explain."""
    killed = logged_ids(rig, r"^failpoint \S+: killing process \d+ at (\S+)$")
    failed = logged_ids(
        rig, r"WARNING workers\.outbox: event (\S+) (?:not confirmed|published, not marked)"
    )
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
        # A kill can fall between the relay's confirm and its mark: at most one relay batch.
        per_kill = rig.prefetch  # the relay's batch: the deliveries a worker holds
        kills: dict[str, int] = {
            w.kind: w.exits.count(-signal.SIGKILL) for w in rig.workers.values()
        }
        kinds = Counter(event_id.rsplit(":", 1)[1] for event_id in duplicated)
        if any(n > kills.get(kind, 0) * per_kill for kind, n in kinds.items()) or (
            set(duplicated.values()) - {2}
        ):
            return [f"events twice beyond {per_kill} per kill {kills}: {duplicated}"]
    return []


def judge(scenario: Scenario, verdict: Verdict, rig: Rig) -> list[str]:
    """What is wrong with this run, judged by the scenario's own crash window."""
    problems = list(rig.problems)
    if verdict.refused:
        problems.append(f"{verdict.refused} refused: {verdict.unanswered[:5]}")
    if verdict.lost:
        problems.append(f"{len(verdict.lost)} lost: {verdict.lost[:10]}")
    if verdict.unexpected:
        problems.append(f"{len(verdict.unexpected)} unexpected: {verdict.unexpected[:10]}")
    in_flight_at_kill = rig.facts.get("in flight at kill", 0) if scenario.no_answer else 0
    if verdict.no_answer > in_flight_at_kill:
        problems.append(
            f"{verdict.no_answer} webhooks got no answer; {in_flight_at_kill} were in flight "
            f"to a killed ingress: {verdict.unanswered[:5]}"
        )
    problems += duplicate_problems(scenario, verdict.duplicated, rig)
    for worker in rig.workers.values():
        kills = scenario.kills if scenario.failpoint else 0
        if scenario.fault is worker_sigkill and worker.kind == "end":
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
                try:
                    await faulting
                except AssertionError as exc:
                    # A fault step timed out: the run is still drained and judged, so that
                    # the table and the logs show what the load and the processes did.
                    rig.problems.append(f"fault step failed: {exc}")
        finally:
            if faulting is not None and not faulting.done():
                faulting.cancel()
                with contextlib.suppress(BaseException):
                    await faulting
            # Under the lock: another run's journalled limits are that run's to put back.
            await asyncio.to_thread(restore_exclusively, services.database_url)
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
    assert not problems, "\n".join([*problems, f"facts: {rig.facts}", rig.log_tails()])
