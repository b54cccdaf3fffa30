"""Publish a webhook confirmed, or spool it when the broker cannot confirm it in time.

While the spool holds webhooks not yet drained, new webhooks join its end, so the broker
gets them in the order they arrived (but for ones answered while an append was in flight).
The drainer sends the spool's head in pipelined batches once the broker confirms again and
forgets each message only after its confirm: a crash between the two sends it again, with
the same message id, and the workers deduplicate it. When the broker refuses one message of a
batch (its queue is full, say), the ones after it may have been stored already; until the
refused one goes through, the drainer sends only it, so those are sent again once, not every
round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from infra.confirmed_publisher import PublishFailedError
from ingress.broker_link import BrokerLink
from ingress.spool import Spool, SpooledMessage

log = logging.getLogger(__name__)

DRAIN_BATCH = 256
DRAIN_RETRY_S = 0.5
REDECLARE_EVERY_S = 5.0


class WebhookRelay:
    def __init__(self, broker: BrokerLink, spool: Spool, confirm_deadline_s: float) -> None:
        self._broker = broker
        self._spool = spool
        self._deadline_s = confirm_deadline_s
        self._draining: asyncio.Task[None] | None = None
        self._redeclared_at = 0.0
        # The last round's batch had a message the broker did not take: send only the head.
        self._head_refused = False
        self.confirmed = 0
        self.spooled = 0

    async def send(
        self, exchange: str, routing_key: str, body: bytes, message_id: str, headers: dict[str, str]
    ) -> bool:
        """True if spooled, False if the broker confirmed it; `SpoolUnavailableError` if neither."""
        # Behind the spool while it holds webhooks not yet drained. Not behind the ones still
        # being written: under a steady load some always are, and the spool would never be
        # left (such a webhook may reach the broker a few ms after a later one; the workers
        # do not depend on order).
        if not self._spool.messages and self._broker.is_ready:
            try:
                await self._broker.publish(
                    exchange,
                    routing_key,
                    body,
                    message_id=message_id,
                    headers=headers,
                    timeout_s=self._deadline_s,
                )
                self.confirmed += 1
                return False
            except PublishFailedError as exc:
                # If the broker stored it after all, the drained copy is a duplicate with the
                # same message id: the workers deduplicate it.
                self._log_spooling(str(exc))
        else:
            self._log_spooling("the broker is not connected")
        message = SpooledMessage(exchange, routing_key, message_id, headers, body, time.time())
        await self._spool.append(message)
        self.spooled += 1
        return True

    def _log_spooling(self, reason: str) -> None:
        if not self._spool.waiting:  # once per outage, not once per webhook
            log.warning("spooling webhooks to %s: %s", self._spool.directory, reason)

    def start(self) -> None:
        self._draining = asyncio.create_task(self._drain(), name="spool-drain")

    async def stop(self) -> None:
        if self._draining is not None:
            self._draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._draining

    async def _drain(self) -> None:
        while True:
            await self._spool.appended.wait()
            try:
                await self._drain_round()
            except Exception:  # the spool's disk failed, or a bug: the webhooks stay spooled
                log.exception("spool drain failed; tried again in %g s", DRAIN_RETRY_S)
                await asyncio.sleep(DRAIN_RETRY_S)

    async def _drain_round(self) -> None:
        if not self._broker.is_ready:
            await asyncio.sleep(DRAIN_RETRY_S)
            return
        batch = await self._spool.read_batch(1 if self._head_refused else DRAIN_BATCH)
        if not batch:
            await asyncio.sleep(DRAIN_RETRY_S)  # counted but not readable yet: a flush runs
            return
        # Published in order on one channel: the broker stores them in that order.
        results = await asyncio.gather(
            *(
                self._broker.publish(
                    m.exchange,
                    m.routing_key,
                    m.body,
                    message_id=m.message_id,
                    headers=m.headers,
                )
                for _, m in batch
            ),
            return_exceptions=True,
        )
        confirmed = 0
        for result in results:
            if isinstance(result, BaseException):
                break
            confirmed += 1
        self._head_refused = confirmed < len(batch)
        if confirmed:
            await self._spool.commit(batch[confirmed - 1][0], confirmed)
            log.info(
                "spool: %d webhooks sent to the broker, %d wait", confirmed, self._spool.messages
            )
        if self._head_refused:
            log.warning("spool drain paused: %r", results[confirmed])
            await asyncio.sleep(DRAIN_RETRY_S)
            if time.monotonic() - self._redeclared_at > REDECLARE_EVERY_S:
                self._redeclared_at = time.monotonic()
                await self._broker.redeclare()
