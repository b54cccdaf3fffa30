"""Run components (ingress, workers) until SIGTERM or SIGINT, then stop them gracefully.

The servers themselves are the components' own: `ingress.serve`, `workers.health`."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

Component = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


# aiohttp's and asyncio's default listen backlog.
BACKLOG = 128

# Python's cycle collector ran ~900 times in a worker storing 30,000 webhooks, 0.8 s of its
# CPU (~5%), most of it rescanning what start-up loaded (phone metadata, models). That is
# frozen out of the collections, and the youngest generation is collected every 10,000 net
# allocations instead of 700: 6 collections, 0.03 s (bench/README.md, "Worker").
GC_THRESHOLD = (10_000, 10, 10)


class StartupError(Exception):
    """A component cannot start at all (its port is taken): one line, no traceback, exit 2."""


def listen(host: str, port: int) -> list[socket.socket]:
    """Bind and listen on every address of `host` now, as asyncio's create_server would."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # one socket per family, as asyncio does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = exc.strerror or str(exc)  # "Address already in use", without "[Errno 98]"
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise StartupError(f"cannot listen on {where}: {reason.lower()}") from exc
    return sockets


async def run_until_signalled(components: list[Component]) -> int:
    """0 after a clean stop on a signal; 1 if a component failed (the others are stopped);
    2 if one could not start (the ones after it in the list are not started at all)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[None]] = []
    for component in components:
        tasks.append(asyncio.create_task(component(stop)))
        # Its first step runs now, before the next component is created: the ingress binds its
        # port there, so a port in use ends the start-up before any connection is opened.
        await asyncio.sleep(0)
        if tasks[-1].done():
            break
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await stopper
    not_started = [result for result in results if isinstance(result, StartupError)]
    for reason in not_started:
        print(f"callpipe: {reason}", file=sys.stderr)
    failed = [
        result
        for result in results
        if isinstance(result, BaseException) and not isinstance(result, StartupError)
    ]
    for error in failed:
        log.error("component failed: %r", error, exc_info=error)
    if not_started:
        return 2
    return 1 if failed else 0


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (Linux), else on asyncio's own loop; with the
    garbage collector tuned for a service (`GC_THRESHOLD`)."""
    gc.collect()  # what start-up left as garbage is not kept for good by the freeze
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
