"""The load of a fault scenario: paced Roistat webhooks and a ledger of every answer."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from callpipe_testing import wait_for
from fault_checker import NO_ANSWER, OK, REFUSED, SPOOLED, Answer

from schemas import codec
from schemas.topology import Kind

PROJECT, TOKEN = "acme", "tok-acme"
HEALTH_CHECK_S = 0.5


def call_body(call_id: str, n: int, kind: str) -> bytes:
    """A Roistat-shaped webhook: the call start, or the call end with its outcome."""
    body: dict[str, Any] = {
        "id": call_id,
        "caller": f"7999{n:07d}",
        "callee": "74950001122",
        "date": "2026-11-25 10:00:00",
        "visit_id": str(100000 + n),
        "marker": "faults",
        "utm_source": "fault-suite",
    }
    if kind == "end":
        body |= {
            "status": ("ANSWER", "NOANSWER", "BUSY")[n % 3],
            "duration": n % 300,
            "file_id": f"f{n}",
            "link": f"https://rec.example/{n}.mp3",
        }
    return codec.dumps(body)


class Load:
    """Open-loop paced webhooks (call starts, each call's end `lag` webhooks later) and a
    ledger of every id and its answer. One connection per webhook, as Roistat sends.

    Posts through a client-side balancer that behaves like a load balancer in front of the
    ingresses: it health-checks `/readyz` every `HEALTH_CHECK_S` and sends to ready targets
    first, and a target that refuses the connection (nothing was sent) is skipped for the
    next, as with `proxy_next_upstream error`. A connection reset after the request went out
    is not retried: a POST may have been taken (Roistat would see an error)."""

    def __init__(self, targets: list[str], calls: int, rate: float, lag: int = 20) -> None:
        self.targets = targets
        self.rate = rate
        self.plan: list[tuple[str, int, Kind]] = []
        for step in range(calls + lag):
            if step < calls:
                self.plan.append((f"c{step}", step, "start"))
            if step >= lag:
                self.plan.append((f"c{step - lag}", step - lag, "end"))
        self.answers: list[Answer] = []
        self.issued = 0
        self.in_flight = 0
        self.ready = dict.fromkeys(targets, True)
        self._holds: list[tuple[int, asyncio.Event]] = []  # (webhooks at most, released)

    @property
    def total(self) -> int:
        return len(self.plan)

    async def run(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        checking = asyncio.create_task(self._health_checks(session))
        started = loop.time()
        tasks = []
        try:
            for i, (call_id, n, kind) in enumerate(self.plan):
                # Pacing, not waiting for a condition: webhook i leaves at i / rate.
                await asyncio.sleep(max(0.0, started + i / self.rate - loop.time()))
                for limit, released in list(self._holds):
                    if i >= limit:
                        held_at = loop.time()
                        await released.wait()
                        started += loop.time() - held_at  # paced on from here, no burst
                tasks.append(asyncio.create_task(self._post(session, i, call_id, n, kind)))
                self.issued += 1
            await asyncio.gather(*tasks)
        finally:
            checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checking

    async def _health_checks(self, session: aiohttp.ClientSession) -> None:
        while True:
            for target in self.targets:
                try:
                    async with session.get(f"{target}/readyz") as response:
                        self.ready[target] = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    self.ready[target] = False
            await asyncio.sleep(HEALTH_CHECK_S)  # the balancer's check interval

    @contextlib.asynccontextmanager
    async def held_at(self, fraction: float) -> AsyncIterator[None]:
        """Send no more than this share of the load until the block is left (also on error).

        A fault's onset goes through service CLIs that a busy machine makes slow (seconds
        each): held here, the rest of the load still goes out under the fault."""
        hold = (math.ceil(fraction * self.total), asyncio.Event())
        self._holds.append(hold)
        try:
            yield
        finally:
            hold[1].set()
            self._holds.remove(hold)

    def progress(self) -> str:
        """What the load has sent and what came back, for a fault step that timed out."""
        outcomes = Counter(answer.outcome for answer in self.answers)
        answered = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        return (
            f"{self.issued} of {self.total} webhooks sent, {self.in_flight} in flight, "
            f"answers: {answered or 'none'}"
        )

    async def reached(self, fraction: float) -> None:
        """Wait until this share of the load has been sent."""

        async def sent() -> bool:
            return self.issued >= fraction * self.total

        await wait_for(sent, seconds=60, what=f"{fraction:.0%} of the load sent")

    async def _post(
        self, session: aiohttp.ClientSession, i: int, call_id: str, n: int, kind: Kind
    ) -> None:
        event_id = f"{PROJECT}:{call_id}:{kind}"
        body = call_body(call_id, n, kind)
        started = time.monotonic()
        self.in_flight += 1
        try:
            outcome, detail = await self._balanced(session, i, kind, body, event_id)
        finally:
            self.in_flight -= 1
        self.answers.append(
            Answer(event_id, call_id, kind, outcome, detail, time.monotonic() - started)
        )

    async def _balanced(
        self, session: aiohttp.ClientSession, i: int, kind: Kind, body: bytes, event_id: str
    ) -> tuple[str, str]:
        detail = "no target"
        turn = [self.targets[(i + k) % len(self.targets)] for k in range(len(self.targets))]
        for target in sorted(turn, key=lambda t: not self.ready[t]):  # ready ones first
            url = f"{target}/roistat/{TOKEN}/call-{kind}"
            try:
                async with session.post(url, data=body) as response:
                    text = await response.text()
                    if response.status != 200:
                        return REFUSED, f"{response.status} {text[:200]}"
                    answer = codec.loads(text)
                    if answer.get("event_id") != event_id:
                        return REFUSED, f"200 for another id: {text[:200]}"
                    return (SPOOLED if answer.get("spooled") else OK), target
            except aiohttp.ClientConnectorError as exc:
                detail = f"{target}: {exc}"  # refused before anything was sent: next target
            except (aiohttp.ClientError, TimeoutError) as exc:
                return NO_ANSWER, f"{target}: {type(exc).__name__}: {exc}"
        return NO_ANSWER, detail
