"""Serve the ingress app on its port until the process is told to stop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from infra.runner import BACKLOG, StartupError, listen
from infra.settings import Settings
from ingress.app import DRAINING, init_app
from ingress.spool import SpoolLockedError

log = logging.getLogger(__name__)


async def serve_ingress(settings: Settings, stop: asyncio.Event) -> None:
    """Serve HTTP until `stop`; then stop accepting, let in-flight requests finish, close."""
    # First, before any await: a port in use fails here, before the broker link (started by the
    # app) or any other component has started, so nothing is left to stop.
    sockets = listen(settings.http_host, settings.http_port)
    try:
        app = init_app(settings)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=settings.shutdown_timeout_s,
            access_log=None,
        )
        try:
            await runner.setup()  # opens the spool
        except SpoolLockedError as exc:
            raise StartupError(str(exc)) from exc
        try:
            for sock in sockets:
                await web.SockSite(runner, sock, backlog=BACKLOG).start()
            log.info("ingress listening on http://%s:%d", settings.http_host, settings.http_port)
            await stop.wait()
            if settings.drain_s > 0:
                # Not ready any more, but still serving: a balancer stops sending, and what is
                # already on its way (even a connection not yet accepted) is answered.
                app[DRAINING].set()
                log.info("ingress draining for %gs before it stops", settings.drain_s)
                await asyncio.sleep(settings.drain_s)
            log.info("ingress stopping: finishing in-flight requests")
        finally:
            await runner.cleanup()
    finally:
        for sock in sockets:
            sock.close()
