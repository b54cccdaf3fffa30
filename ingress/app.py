"""The ingress aiohttp application, built by one factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.kept_queues import bounds_of
from infra.settings import Settings
from ingress.auth import TokenMap
from ingress.broker_link import BrokerLink
from ingress.handlers import WebhookHandler, json_error
from ingress.metrics import IngressMetrics
from ingress.relay import WebhookRelay
from ingress.spool import Spool

log = logging.getLogger(__name__)

BROKER = web.AppKey("broker", BrokerLink)
METRICS = web.AppKey("metrics", IngressMetrics)
SPOOL = web.AppKey("spool", Spool)
RELAY = web.AppKey("relay", WebhookRelay)
DRAINING = web.AppKey("draining", asyncio.Event)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def count_and_explain(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by route; give aiohttp's own errors (404, 405) a JSON body."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = json_error(exc.status, exc.reason.lower())
    except Exception:
        # A bug: counted like any answer (alert on status="500"), logged once, never a hang.
        log.exception("unexpected error on %s %s", request.method, route)
        response = json_error(500, "internal error")
    request.app[METRICS].count_request(route, response.status)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while a webhook can be taken: the broker confirms, or the spool has room."""
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining: stopping soon"}, status=503)
    spool, broker_ready = request.app[SPOOL], request.app[BROKER].is_ready
    if spool.stalled and (spool.waiting or not broker_ready):  # webhooks need the spool now
        return web.json_response({"status": "the spool's disk is not answering"}, status=503)
    if broker_ready:
        return web.json_response({"status": "ready"})
    if spool.has_room:
        return web.json_response({"status": "ready", "spooling": True})
    return web.json_response({"status": "broker not connected and spool full"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    spool, gauges = request.app[SPOOL], request.app[METRICS]
    gauges.spool_bytes.set(spool.bytes)
    gauges.spool_messages.set(spool.messages)
    gauges.spool_oldest_age.set(spool.oldest_age_s())
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def init_app(settings: Settings) -> web.Application:
    """The ingress app; its broker connection opens on start-up and closes in cleanup."""
    tokens = TokenMap(settings.project_by_token)
    if not tokens:
        raise ValueError("CALLPIPE_TOKENS is empty: set it to project:token[,project:token...]")
    app = web.Application(middlewares=[count_and_explain])
    broker = BrokerLink(
        settings.amqp_url, settings.topology, settings.publish_timeout_s, bounds_of(settings)
    )
    # Room means room for the largest body, with its headers.
    spool = Spool(settings.spool_path, settings.spool_max_bytes, settings.max_body_bytes + 4096)
    relay = WebhookRelay(broker, spool, settings.confirm_deadline_s)
    app[BROKER], app[SPOOL], app[RELAY] = broker, spool, relay
    app[DRAINING] = asyncio.Event()
    app[METRICS] = IngressMetrics()
    handler = WebhookHandler(
        tokens, relay, settings.topology, settings.max_body_bytes, app[METRICS]
    )

    async def broker_and_spool(app: web.Application) -> AsyncIterator[None]:
        spool.open()  # before the first request: what a crash left is sent first
        broker.start()
        relay.start()
        yield
        # Cleanup runs after in-flight handlers have had their confirms or their fsyncs.
        await relay.stop()
        await broker.close()
        spool.close()

    app.cleanup_ctx.append(broker_and_spool)
    app.router.add_post("/roistat/{token}/call-start", handler.call_start)
    app.router.add_post("/roistat/{token}/call-end", handler.call_end)
    app.router.add_post("/roistat/{token}", handler.call_any)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
