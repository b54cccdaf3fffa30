"""Break and mend the machine's real RabbitMQ and PostgreSQL, and never leave them broken.

Every change to the broker's limits is written to a journal before it is made, so the
session's safety net (and the next run, after a crash of this one) puts back what was there.
`restore_services()` is synchronous, idempotent, and safe to call at any time: it puts back
the journalled limits, starts the RabbitMQ app or the PostgreSQL cluster if stopped, and
waits until both are healthy. Disruptive scenarios hold a lock that is machine-wide, so two
test runs on one machine never overlap their outages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

JOURNAL = Path(tempfile.gettempdir()) / "callpipe-service-faults.json"
LOCK = Path(tempfile.gettempdir()) / "callpipe-service-faults.lock"
ENSURE_SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "ensure-services"
HEALTHY_WITHIN_S = 120.0
DEFAULT_WATERMARK = ["0.4"]  # RabbitMQ's own default, if nothing better is known


class ServiceCommandError(AssertionError):
    pass


def run(
    *command: str, timeout: float = 90.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ServiceCommandError(f"{' '.join(command)}: no answer within {timeout}s") from exc
    if check and result.returncode != 0:
        raise ServiceCommandError(
            f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}"
        )
    return result


def rabbitmqctl(*args: str, timeout: float = 90.0) -> str:
    return run("rabbitmqctl", "-q", *args, timeout=timeout).stdout.strip()


def broker_eval(expression: str) -> str:
    return rabbitmqctl("eval", expression)


# ---- can this run control the services its tests use? ---------------------------------------


def why_not_controllable(amqp_url: str, database_url: str) -> str | None:
    """None if the services are this machine's and its tools can stop and start them."""
    for url in (amqp_url, database_url):
        host = urlsplit(url).hostname or "127.0.0.1"
        if host not in ("127.0.0.1", "localhost", "::1"):
            return f"{url} is not on this machine"
    if urlsplit(amqp_url).port not in (None, 5672):
        return f"{amqp_url} is not the local RabbitMQ on 5672 (a container?)"
    for tool in ("rabbitmqctl", "rabbitmq-diagnostics", "pg_ctlcluster", "pg_lsclusters"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "stopping the services needs root"
    if postgres_cluster(database_url) is None:
        return f"no PostgreSQL cluster of this machine listens on the port of {database_url}"
    return None


def other_test_runs() -> list[str]:
    """Other pytest sessions on this machine: not this one, nor the processes it runs under.

    Their tests use the same RabbitMQ and PostgreSQL: an outage would break them."""
    mine = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if {"pytest", "py.test"} & {Path(arg).name for arg in args if arg}:
            found.append(f"{entry.name} ({' '.join(args)[:80].strip()})")
    return found


# ---- RabbitMQ ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerLimits:
    """Arguments of `set_vm_memory_high_watermark` and `set_disk_free_limit`, as they were."""

    watermark: list[str]
    disk_free_limit: list[str]


def read_broker_limits() -> BrokerLimits:
    watermark = broker_eval("vm_memory_monitor:get_vm_memory_high_watermark().")
    if watermark.startswith("{absolute,"):  # {absolute,1073741824}
        args = ["absolute", watermark.strip("{}").split(",")[1]]
    else:
        args = [watermark]
    disk = broker_eval("rabbit_disk_monitor:get_disk_free_limit().")
    return BrokerLimits(args, [str(int(disk))])


def broker_disk_free() -> int:
    return int(broker_eval("rabbit_disk_monitor:get_disk_free()."))


def journal_limits() -> None:
    """Note the broker's limits before changing one (kept if a journal is already there)."""
    if JOURNAL.exists():
        return
    limits = read_broker_limits()
    if limits.watermark in (["0"], ["0.0"]):  # left by a crashed run without a journal
        limits = BrokerLimits(configured_watermark(), limits.disk_free_limit)
    JOURNAL.write_text(json.dumps(limits.__dict__))


def configured_watermark() -> list[str]:
    value = broker_eval("application:get_env(rabbit, vm_memory_high_watermark).")
    number = value.removeprefix("{ok,").removesuffix("}")
    try:
        return [number] if float(number) > 0 else DEFAULT_WATERMARK
    except ValueError:
        return DEFAULT_WATERMARK


def set_watermark(args: list[str]) -> None:
    rabbitmqctl("set_vm_memory_high_watermark", *args)


def set_disk_free_limit(args: list[str]) -> None:
    rabbitmqctl("set_disk_free_limit", *args)


def broker_running() -> bool:
    return (
        run("rabbitmq-diagnostics", "-q", "check_running", timeout=30, check=False).returncode == 0
    )


def broker_alarms() -> str:
    """'' when the node has no alarm, else what it reports."""
    result = run("rabbitmq-diagnostics", "-q", "check_local_alarms", timeout=30, check=False)
    return "" if result.returncode == 0 else (result.stdout + result.stderr).strip()


def _put_back_limits() -> None:
    if not JOURNAL.exists():
        if read_broker_limits().watermark in (["0"], ["0.0"]):
            set_watermark(configured_watermark())
        return
    saved = json.loads(JOURNAL.read_text())
    set_watermark(saved["watermark"])
    set_disk_free_limit(saved["disk_free_limit"])
    JOURNAL.unlink()


# ---- PostgreSQL -------------------------------------------------------------------------------


def postgres_cluster(database_url: str) -> tuple[str, str] | None:
    """(version, name) of the local cluster on the database URL's port, from pg_lsclusters."""
    port = str(urlsplit(database_url).port or 5432)
    listing = run("pg_lsclusters", "--no-header", timeout=30, check=False).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == port:
            return fields[0], fields[1]
    return None


def postgres_ready(database_url: str) -> bool:
    port = str(urlsplit(database_url).port or 5432)
    return (
        run("pg_isready", "-q", "-h", "127.0.0.1", "-p", port, timeout=30, check=False).returncode
        == 0
    )


def pg_ctlcluster(database_url: str, *args: str) -> None:
    cluster = postgres_cluster(database_url)
    if cluster is None:
        raise ServiceCommandError(f"no local PostgreSQL cluster for {database_url}")
    run("pg_ctlcluster", "--skip-systemctl-redirect", *cluster, *args, timeout=120)


# ---- the safety net ---------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, seconds: float = HEALTHY_WITHIN_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise ServiceCommandError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.5)


class OutageLock:
    """One disruptive scenario at a time on this machine, whichever test run it belongs to."""

    def __init__(self) -> None:
        self._fd = -1

    def acquire(self, seconds: float = 120.0) -> None:
        if self._fd >= 0:  # still ours: a timed-out scenario never got to release it
            return
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ServiceCommandError(
                        f"another test run held {LOCK} for {seconds}s"
                    ) from None
                time.sleep(0.2)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


# The one lock of this process: a scenario that timed out still holds it, and that is ours.
OUTAGES = OutageLock()


def restore_exclusively(database_url: str, wait_s: float = 10.0) -> bool:
    """`restore_services`, never in the middle of another run's scenario: while another run
    holds the lock, mending is its job (False)."""
    held = OUTAGES.held
    try:
        OUTAGES.acquire(wait_s)
    except ServiceCommandError:
        return False
    try:
        restore_services(database_url)
        return True
    finally:
        if not held:
            OUTAGES.release()


def restore_services(database_url: str) -> None:
    """Start what is stopped, put back the journalled limits, wait until both are healthy."""
    problems: list[str] = []
    try:
        if not broker_running():
            result = run("rabbitmqctl", "start_app", timeout=120, check=False)
            if result.returncode != 0:  # the node itself is down
                run(str(ENSURE_SERVICES), timeout=180, check=False)
            wait_until(broker_running, "RabbitMQ to run")
        _put_back_limits()
        wait_until(lambda: not broker_alarms(), "RabbitMQ's alarms to clear")
    except ServiceCommandError as exc:
        problems.append(str(exc))
    try:
        if not postgres_ready(database_url):
            with contextlib.suppress(ServiceCommandError):
                pg_ctlcluster(database_url, "start")
            wait_until(lambda: postgres_ready(database_url), "PostgreSQL to accept connections")
    except ServiceCommandError as exc:
        problems.append(str(exc))
    if problems:
        raise ServiceCommandError("services not restored: " + "; ".join(problems))
