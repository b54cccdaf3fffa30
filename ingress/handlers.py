"""The webhook handler: authenticate, check the body, publish it unchanged, answer."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web

from ingress.auth import TokenMap
from ingress.metrics import IngressMetrics
from ingress.relay import WebhookRelay
from ingress.spool import SpoolUnavailableError
from schemas import codec
from schemas.roistat import InvalidWebhookError, call_id_of, detect_kind, read_webhook
from schemas.topology import (
    HEADER_KIND,
    HEADER_PROJECT,
    HEADER_RECEIVED_AT,
    HEADER_REJECT_REASON,
    HEADER_REMOTE_ADDR,
    ROUTING_KEY_BY_KIND,
    ROUTING_KEY_REJECTED,
    Kind,
    Topology,
    event_id,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"

# Bodies that are not JSON at all are 400; JSON of the wrong shape is 422.
STATUS_BY_REASON = {"not_json": 400, "not_utf8": 400, "too_deep": 400, "bad_encoding": 400}


class BodyTooLargeError(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, or `BodyTooLargeError` as soon as it passes `limit` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLargeError(declared)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(size)
        chunks.append(chunk)
    return b"".join(chunks)


class WebhookHandler:
    def __init__(
        self,
        tokens: TokenMap,
        relay: WebhookRelay,
        topology: Topology,
        max_body_bytes: int,
        metrics: IngressMetrics,
    ) -> None:
        self._tokens = tokens
        self._relay = relay
        self._topology = topology
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics

    async def call_start(self, request: web.Request) -> web.Response:
        return await self._accept(request, "start")

    async def call_end(self, request: web.Request) -> web.Response:
        return await self._accept(request, "end")

    async def call_any(self, request: web.Request) -> web.Response:
        return await self._accept(request, None)

    async def _accept(self, request: web.Request, kind: Kind | None) -> web.Response:
        project = self._tokens.project_for(request.match_info["token"])
        if project is None:
            return json_error(404, "not found")
        try:
            body = await read_limited(request, self._max_body_bytes)
        except BodyTooLargeError as exc:
            self._metrics.oversize.inc()
            log.warning(
                "rejected oversize body: %d bytes > %d, project %s, from %s",
                exc.size,
                self._max_body_bytes,
                project,
                request.remote,
            )
            return json_error(413, f"body is larger than the limit of {self._max_body_bytes} bytes")
        except web.RequestPayloadError:
            # aiohttp decompresses on the fly: a broken gzip or deflate stream is lost with its
            # bytes, but the attempt is kept (and counted) as a rejected body.
            encoding = request.headers.get("Content-Encoding", "")
            # Nothing more can be read from this connection: close it after the answer, and
            # don't let the server drain the broken stream again (it would log a traceback).
            request.content.feed_eof()
            response = await self._reject(
                b"",
                self._headers(request, project),
                kind,
                InvalidWebhookError(
                    "bad_encoding", f"the body is not valid {encoding or 'compressed'} data"
                ),
            )
            response.force_close()
            return response
        headers = self._headers(request, project)
        try:
            document = read_webhook(body)
        except InvalidWebhookError as exc:
            return await self._reject(body, headers, kind, exc)
        kind = kind or detect_kind(document)
        call_id = call_id_of(document["id"])
        assert call_id is not None  # read_webhook guarantees a usable id
        accepted_id = event_id(project, call_id, kind)
        headers[HEADER_KIND] = kind
        spooled = await self._publish(
            self._topology.webhooks_exchange, ROUTING_KEY_BY_KIND[kind], body, accepted_id, headers
        )
        if spooled is None:
            return self._unavailable()
        answer = {"accepted": True, "event_id": accepted_id}
        if spooled:
            answer["spooled"] = True
        return web.Response(body=codec.dumps(answer), content_type="application/json")

    @staticmethod
    def _headers(request: web.Request, project: str) -> dict[str, str]:
        return {
            HEADER_PROJECT: project,
            HEADER_RECEIVED_AT: datetime.now(UTC).isoformat(),
            HEADER_REMOTE_ADDR: request.remote or "",
        }

    async def _reject(
        self, body: bytes, headers: dict[str, str], kind: Kind | None, exc: InvalidWebhookError
    ) -> web.Response:
        """Answer the error, but keep the body in `{ns}.rejected` for a human to look at."""
        headers[HEADER_REJECT_REASON] = exc.reason
        if kind is not None:
            headers[HEADER_KIND] = kind
        message_id = f"{headers[HEADER_PROJECT]}:rejected:{uuid.uuid4().hex}"
        if (
            await self._publish(
                self._topology.webhooks_exchange, ROUTING_KEY_REJECTED, body, message_id, headers
            )
            is None
        ):
            return self._unavailable()
        self._metrics.rejected.labels(exc.reason).inc()
        log.info(
            "rejected body (%s), project %s, from %s, kept in %s",
            exc.reason,
            headers[HEADER_PROJECT],
            headers[HEADER_REMOTE_ADDR],
            self._topology.rejected_queue,
        )
        return json_error(STATUS_BY_REASON.get(exc.reason, 422), exc.message)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: dict[str, str],
    ) -> bool | None:
        """True: spooled; False: confirmed by the broker; None: neither (answer 503)."""
        started = time.perf_counter()
        seconds = self._metrics.publish_seconds_by_outcome
        try:
            spooled = await self._relay.send(exchange, routing_key, body, message_id, headers)
        except SpoolUnavailableError as exc:
            seconds["failed"].observe(time.perf_counter() - started)
            log.error("%s neither confirmed nor spooled, answering 503: %s", message_id, exc)
            return None
        seconds["spooled" if spooled else "confirmed"].observe(time.perf_counter() - started)
        return spooled

    @staticmethod
    def _unavailable() -> web.Response:
        return json_error(
            503,
            "the webhook could be neither confirmed by the broker nor spooled; retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        )
