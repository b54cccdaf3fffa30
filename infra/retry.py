"""Start-up steps wait for their service instead of crashing: retried with capped backoff.
Stop steps never hang on a service that is gone: `close_quietly`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Short enough that a service coming back is noticed within seconds, not after a long backoff.
MAX_DELAY_S = 2.0

# After the drain (SHUTDOWN_TIMEOUT_S) each close gets this long at most, so a stop stays
# within Docker's grace period even when the broker or database is gone.
CLOSE_TIMEOUT_S = 2.0


class StoppedError(Exception):
    """A stop was asked for while a start-up step was still waiting for its service."""


async def retry_until_done(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    stop: asyncio.Event | None = None,
) -> T:
    """Run `attempt` until it succeeds; `StoppedError` as soon as `stop` is set."""
    delay = 0.5
    stop = stop or asyncio.Event()
    while True:
        try:
            return await _unless_stopped(what, attempt, stop)
        except retry_on as exc:
            log.warning("%s failed (%r); retrying in %.1fs", what, exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            raise StoppedError(what)
        delay = min(delay * 2, MAX_DELAY_S)


async def _unless_stopped(what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
    """One attempt, abandoned when `stop` is set (a hung connect must not hold up a stop)."""
    trying = asyncio.ensure_future(attempt())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([trying, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not trying.done():
        trying.cancel()
        with contextlib.suppress(BaseException):
            await trying
        raise StoppedError(what)
    return trying.result()


async def close_quietly(close: Callable[[], Awaitable[object]]) -> None:
    """Closing what is already broken must neither fail nor hang the stop."""
    try:
        await asyncio.wait_for(close(), timeout=CLOSE_TIMEOUT_S)
    except Exception as exc:
        log.warning("%r while closing", exc)
