"""Run components (ingress, workers) until SIGTERM or SIGINT, then stop them gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from callpipe.settings import Settings
from ingress.app import init_app

log = logging.getLogger(__name__)

Component = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def serve_ingress(settings: Settings, stop: asyncio.Event) -> None:
    """Serve HTTP until `stop`; then stop accepting, let in-flight requests finish, close."""
    app = init_app(settings)
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=settings.shutdown_timeout_s, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        log.info("ingress listening on http://%s:%d", settings.http_host, settings.http_port)
        await stop.wait()
        log.info("ingress stopping: finishing in-flight requests")
    finally:
        await runner.cleanup()


async def run_until_signalled(components: list[Component]) -> int:
    """0 after a clean stop on a signal; 1 if a component failed (the others are stopped)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(component(stop)) for component in components]
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [result for result in results if isinstance(result, BaseException)]
    for error in failed:
        log.error("component failed: %r", error, exc_info=error)
    return 1 if failed else 0


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (Linux), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
