"""`callpipe subscribe` and `callpipe replay-events`: a downstream system's own queue on
`{ns}.events`, and catching such a queue up from the events stored in `call_events`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiormq
import asyncpg
from aio_pika.abc import AbstractRobustConnection

from infra.broker import declare_topology, work_queue_arguments
from infra.confirmed_publisher import ConfirmedPublisher, PublishFailedError
from infra.kept_queues import DEFAULT_BOUNDS, KeptQueueBounds
from infra.retry import retry_until_done
from schemas import codec
from schemas.topology import HEADER_ROUTING_KEY, Topology, routing_key_of, topic_matches

# Publishes awaiting their confirms at once: enough to keep the link busy, few enough that a
# failure leaves little to sort out (the rest is simply replayed again; receivers dedupe).
IN_FLIGHT = 256
SINK_PREFIX = "sink."
DATABASE_SILENT_S = 60.0  # longest wait for one answer of the database during a replay
DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


class SubscriptionError(Exception):
    """An expected failure with a message for the operator (no traceback needed)."""


@dataclass(frozen=True)
class SubscribeReport:
    queue: str
    bound: tuple[str, ...]
    unbound: tuple[str, ...]
    waiting: int

    def lines(self) -> list[str]:
        lines = [f"queue {self.queue} declared ({self.waiting} messages waiting)"]
        lines += [f"bound to {key!r}" for key in self.bound]
        lines += [
            f"unbound from {key!r} (nothing to do if it was not bound)" for key in self.unbound
        ]
        lines.append(
            "bindings from earlier runs are kept: remove one with --unbind KEY"
            " (the RabbitMQ management UI lists them all)"
        )
        return lines


async def subscribe(
    connection: AbstractRobustConnection,
    topology: Topology,
    name: str,
    *,
    bind: Sequence[str],
    unbind: Sequence[str] = (),
    bounds: KeptQueueBounds = DEFAULT_BOUNDS,
) -> SubscribeReport:
    """Declare `{ns}.sub.{name}` like a work queue, bound to `{ns}.events`. Idempotent."""
    queue_name = topology.subscription_queue(name)
    async with connection.channel() as channel:
        # Setup's objects, idempotently: the events exchange, and `{ns}.dead` for dead letters.
        await declare_topology(channel, topology, bounds)
        try:
            queue = await channel.declare_queue(
                queue_name, durable=True, arguments=work_queue_arguments(topology)
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise SubscriptionError(
                f"queue {queue_name} exists with other settings ({exc}): delete it, or choose"
                " another name"
            ) from exc
        for key in bind:
            await queue.bind(topology.events_exchange, routing_key=key)
        for key in unbind:
            await queue.unbind(topology.events_exchange, routing_key=key)
    return SubscribeReport(
        queue=queue_name,
        bound=tuple(bind),
        unbound=tuple(unbind),
        waiting=queue.declaration_result.message_count or 0,
    )


def target_queue(topology: Topology, target: str) -> str:
    """`NAME` is the subscription queue `{ns}.sub.NAME`; `sink.NAME` a sink's `{ns}.sink.NAME`."""
    if target.startswith(SINK_PREFIX):
        return topology.sink_queue(target.removeprefix(SINK_PREFIX))
    return topology.subscription_queue(target)


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is UTC (a date: its midnight UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date or date-time"
            " (e.g. 2026-11-25, 2026-11-25T10:00:00Z, 2026-11-25T13:00:00+03:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class EventFilter:
    """Which stored events to replay. Times are on `received_at`: since inclusive, until not."""

    since: datetime | None = None
    until: datetime | None = None
    project: str | None = None
    bindings: tuple[str, ...] = ()  # topic binding keys; none: every routing key

    def wants(self, routing_key: str) -> bool:
        return not self.bindings or any(topic_matches(key, routing_key) for key in self.bindings)


@dataclass
class ReplayEventsReport:
    queue: str
    replayed: int = 0
    not_bound: int = 0  # stored events in range whose routing key no --bind matched

    def line(self) -> str:
        line = f"replayed {self.replayed} events to {self.queue}"
        if self.not_bound:
            line += f" ({self.not_bound} others in range did not match --bind)"
        return line


# Ordered as they were received; event_id breaks ties so that a re-run replays the same order.
_SELECT_EVENTS = """
SELECT event_id, received_at, event::text AS event FROM "{schema}".call_events
WHERE event IS NOT NULL
  AND ($1::timestamptz IS NULL OR received_at >= $1)
  AND ($2::timestamptz IS NULL OR received_at < $2)
  AND ($3::text IS NULL OR project = $3)
ORDER BY received_at, event_id
"""


@dataclass(frozen=True)
class _Outgoing:
    event_id: str
    received_at: datetime
    routing_key: str
    body: bytes


async def replay_events(
    connection: AbstractRobustConnection,
    database_url: str,
    topology: Topology,
    target: str,
    event_filter: EventFilter,
    *,
    timeout_s: float,
    in_flight: int = IN_FLIGHT,
) -> ReplayEventsReport:
    """Publish the stored events that pass `event_filter` straight to the target's queue.

    The body is the envelope exactly as encoded for `{ns}.events`; the routing key it had there
    goes in the `x-callpipe-routing-key` header (the queue name is the routing key now).
    Nothing is published when the queue does not exist.
    """
    queue = target_queue(topology, target)
    await _check_queue_exists(connection, queue, target)
    report = ReplayEventsReport(queue)
    conn = await retry_until_done(
        "connecting to the database",
        lambda: asyncpg.connect(
            database_url,
            server_settings={"application_name": "callpipe-replay-events"},
            # A database gone silent (no reset) ends the replay with a --since to resume
            # from, instead of a fetch that waits for TCP to give up.
            command_timeout=DATABASE_SILENT_S,
        ),
        retry_on=DATABASE_DOWN,
    )
    publisher = await ConfirmedPublisher.open(connection, timeout_s)
    batch: list[_Outgoing] = []
    last_sent: datetime | None = None  # received_at of the last event confirmed
    finished = False
    try:
        # One snapshot for the whole run; rows come in batches, never all at once.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = conn.cursor(
                _SELECT_EVENTS.format(schema=topology.namespace),
                event_filter.since,
                event_filter.until,
                event_filter.project,
                prefetch=in_flight,
            )
            async for row in _checked_rows(rows, topology.namespace):
                event: dict[str, Any] = codec.loads(row["event"])
                routing_key = routing_key_of(event)
                if not event_filter.wants(routing_key):
                    report.not_bound += 1
                    continue
                batch.append(
                    _Outgoing(row["event_id"], row["received_at"], routing_key, codec.dumps(event))
                )
                if len(batch) >= in_flight:
                    await _publish_batch(publisher, queue, batch, report)
                    last_sent, batch = batch[-1].received_at, []
            await _publish_batch(publisher, queue, batch, report)
            finished = True
    except Exception as exc:
        if not (isinstance(exc, DATABASE_DOWN) or conn.is_closed()):
            raise
        if finished:  # lost while ending a read-only snapshot: every event went out
            return report
        # Lost midway (leaving the transaction on a closed connection fails in its own way:
        # the loss is what happened). The events go out in order: a replay from the first
        # one not sent sends the rest.
        lost = (exc.__context__ or exc) if isinstance(exc, asyncpg.InterfaceError) else exc
        resume = batch[0].received_at if batch else last_sent or event_filter.since
        again = "run the replay again" + (f" with --since {resume.isoformat()}" if resume else "")
        raise SubscriptionError(
            f"lost the database ({type(lost).__name__}: {lost}); {report.replayed} events "
            f"were replayed. To send the rest, {again} (receivers dedupe by event_id)"
        ) from None
    finally:
        await publisher.close()
        try:
            await conn.close(timeout=5)
        except Exception:  # a connection lost midway: drop it, its error was said above
            conn.terminate()
    return report


async def _check_queue_exists(
    connection: AbstractRobustConnection, queue: str, target: str
) -> None:
    # A passive declare that fails closes its channel: a channel of its own, then.
    try:
        async with connection.channel() as channel:
            await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        how = (
            "configure the sink and run `callpipe setup`"
            if target.startswith(SINK_PREFIX)
            else f"create it with `callpipe subscribe {target} --bind KEY`"
        )
        raise SubscriptionError(f"queue {queue} does not exist: {how}") from None


async def _checked_rows(
    rows: AsyncIterable[asyncpg.Record], namespace: str
) -> AsyncIterator[asyncpg.Record]:
    """The cursor's rows; a database without the schema is an operator's mistake, said plainly."""
    try:
        async for row in rows:
            yield row
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        raise SubscriptionError(
            f"no table {namespace}.call_events in the database: run `callpipe setup` first"
        ) from None


async def _publish_batch(
    publisher: ConfirmedPublisher,
    queue: str,
    batch: Sequence[_Outgoing],
    report: ReplayEventsReport,
) -> None:
    """Publish a batch pipelined on one channel (in order), then wait for every confirm."""
    results = await asyncio.gather(
        *(
            publisher.publish(
                "",  # the default exchange routes by queue name
                queue,
                outgoing.body,
                message_id=outgoing.event_id,
                headers={HEADER_ROUTING_KEY: outgoing.routing_key},
                mandatory=True,
            )
            for outgoing in batch
        ),
        return_exceptions=True,
    )
    failures = [
        (outgoing, result)
        for outgoing, result in zip(batch, results, strict=True)
        if isinstance(result, BaseException)
    ]
    report.replayed += len(results) - len(failures)
    if failures:
        first_failed, first = failures[0]
        if not isinstance(first, PublishFailedError):
            raise first
        # Everything before the first event not confirmed went out, in order: a replay from
        # its time on sends the rest (and again the few confirmed after it, which receivers
        # dedupe by event_id).
        raise SubscriptionError(
            f"{len(failures)} publishes to {queue} were not confirmed ({first}); "
            f"{report.replayed} events were replayed. To send the rest, run the replay again "
            f"with --since {first_failed.received_at.isoformat()} (receivers dedupe by event_id)"
        )
