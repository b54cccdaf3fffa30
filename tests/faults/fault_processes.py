"""The processes of a fault scenario: `callpipe ingress` and `callpipe worker KIND`, run as
the operator runs them, their logs in files, workers restarted when they die as a supervisor
would, and a register of every pid so that nothing outlives the test run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
from callpipe_testing import wait_for

from schemas.topology import Kind

STOP_TIMEOUT_S = 20.0

# Every process a rig started and nobody has reaped yet (a timeout can cut a scenario short).
LIVE_PIDS: set[int] = set()


def kill_leftovers() -> None:
    """SIGKILL whatever a rig started and did not stop (paused ones included)."""
    for pid in list(LIVE_PIDS):
        for signum in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        LIVE_PIDS.discard(pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CallpipeProcess:
    """One `callpipe ...` process; its stderr appended to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "callpipe",
                *self.args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        LIVE_PIDS.add(self.process.pid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        LIVE_PIDS.discard(self.process.pid)
        return code

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code."""
        if self.process is None:
            return None
        self.send(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            self.send(signal.SIGKILL)
            return await self.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SupervisedWorker:
    """`callpipe worker KIND`, restarted whenever it dies (as `restart: always` does); armed
    with a failpoint for its first `kills` lives."""

    def __init__(
        self, kind: Kind, env: dict[str, str], log_dir: Path, failpoint: str | None, kills: int
    ) -> None:
        self.kind = kind
        self._env = env
        self._log_path = log_dir / f"worker-{kind}.log"
        self._failpoint = failpoint
        self._kills = kills
        self.exits: list[int] = []
        self.current = self._make()
        self._stopping = False
        self._watching: asyncio.Task[None] | None = None

    def _make(self) -> CallpipeProcess:
        env = dict(self._env)
        if self._failpoint is not None and len(self.exits) < self._kills:
            env["CALLPIPE_FAILPOINT"] = self._failpoint
        return CallpipeProcess(["worker", self.kind], env, self._log_path)

    async def start(self) -> None:
        await self.current.start()
        self._watching = asyncio.create_task(self._watch(), name=f"supervise-{self.kind}")

    async def _watch(self) -> None:
        while True:
            self.exits.append(await self.current.wait())
            if self._stopping:
                return
            self.current = self._make()
            await self.current.start()
            if self._stopping:
                await self.current.stop()
                return

    def kill(self) -> None:
        self.current.send(signal.SIGKILL)

    async def stop(self) -> None:
        self._stopping = True
        await self.current.stop()
        if self._watching is not None:
            await self._watching

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""


class Ingress:
    """`callpipe ingress` on a port and spool directory of its own (kept across restarts)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.spool_dir = log_dir / f"spool-{name}"
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **env,
            "CALLPIPE_HTTP_PORT": str(self.port),
            "CALLPIPE_SPOOL_DIR": str(self.spool_dir),
        }
        self._log_path = log_dir / f"ingress-{name}.log"
        self.process = CallpipeProcess(["ingress"], self._env, self._log_path)
        self.exits: list[int] = []

    async def start(self, session: aiohttp.ClientSession, *, connected: bool = True) -> None:
        """Start, and wait until ready (`connected`: with its broker link up, not spooling)."""
        self.process = CallpipeProcess(["ingress"], self._env, self._log_path)
        await self.process.start()

        async def ready() -> bool:
            try:
                async with session.get(f"{self.url}/readyz") as response:
                    body = await response.json()
                    return response.status == 200 and (not connected or "spooling" not in body)
            except aiohttp.ClientError:
                return False

        await wait_for(ready, seconds=30, what=f"ingress {self.name} ready")

    async def spooled(self, session: aiohttp.ClientSession) -> float:
        """The webhooks its spool holds now."""
        async with session.get(f"{self.url}/metrics") as response:
            text = await response.text()
        match = re.search(r"^callpipe_ingress_spool_messages (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def stop(self) -> None:
        code = await self.process.stop()
        if code is not None:
            self.exits.append(code)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
