"""Prometheus metrics of the workers of one process: one registry, children per queue kind."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.topology import KINDS, Kind

# Most deliveries take milliseconds; an outage holds one for minutes (retried until it works).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class InFlight:
    """When each delivery now held (taken, not yet acked or handed back) was taken."""

    taken_at: dict[object, float] = field(default_factory=dict)

    def take(self, delivery: object) -> None:
        self.taken_at[delivery] = time.monotonic()

    def settle(self, delivery: object) -> None:
        self.taken_at.pop(delivery, None)

    def oldest_age_s(self) -> float:
        """Seconds the oldest held delivery has been held; 0 when none is."""
        return max(time.monotonic() - min(self.taken_at.values(), default=time.monotonic()), 0.0)


@dataclass(frozen=True)
class KindMetrics:
    """The children of one queue kind, bound once: counting a delivery is a plain `inc()`."""

    processed: Counter
    duplicates: Counter
    retries: Counter
    dead_lettered: Counter
    processing_seconds: Histogram
    in_flight: InFlight
    events_published: Counter
    outbox_pending: Gauge


class WorkerMetrics:
    """Everything the workers of this process count, served on CALLPIPE_METRICS_PORT."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        processed = Counter(
            "callpipe_worker_processed",
            "Webhooks stored (row merged, event committed to the outbox), by kind",
            ["kind"],
            registry=self.registry,
        )
        duplicates = Counter(
            "callpipe_worker_duplicates",
            "Deliveries whose event id was stored before (Roistat repeats, redeliveries)",
            ["kind"],
            registry=self.registry,
        )
        retries = Counter(
            "callpipe_worker_retries",
            "Failed attempts that will be tried again (database or broker away, unexpected errors)",
            ["kind"],
            registry=self.registry,
        )
        dead_lettered = Counter(
            "callpipe_worker_dead_lettered",
            "Deliveries kept in {ns}.dead with the reason, then acked",
            ["kind"],
            registry=self.registry,
        )
        seconds = Histogram(
            "callpipe_worker_processing_seconds",
            "From taking a delivery to its ack (or hand-back at shutdown), retries included",
            ["kind"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        oldest = Gauge(
            "callpipe_worker_oldest_unacked_age_seconds",
            "Age of the oldest delivery this process holds unacked (0 when none)",
            ["kind"],
            registry=self.registry,
        )
        published = Counter(
            "callpipe_worker_events_published",
            "Events the outbox relay published (confirmed) and marked, by kind",
            ["kind"],
            registry=self.registry,
        )
        pending = Gauge(
            "callpipe_worker_outbox_pending",
            "Events committed and handed to this process's relay, not yet published",
            ["kind"],
            registry=self.registry,
        )
        self._kinds: dict[str, KindMetrics] = {}
        for kind in KINDS:
            in_flight = InFlight()
            oldest.labels(kind).set_function(in_flight.oldest_age_s)
            self._kinds[kind] = KindMetrics(
                processed=processed.labels(kind),
                duplicates=duplicates.labels(kind),
                retries=retries.labels(kind),
                dead_lettered=dead_lettered.labels(kind),
                processing_seconds=seconds.labels(kind),
                in_flight=in_flight,
                events_published=published.labels(kind),
                outbox_pending=pending.labels(kind),
            )

    def of(self, kind: Kind) -> KindMetrics:
        return self._kinds[kind]
