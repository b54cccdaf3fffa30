"""Prometheus metrics of one ingress app (own registry, so apps in one process don't clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PUBLISH_OUTCOMES = ("confirmed", "spooled", "failed")


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "callpipe_ingress_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "callpipe_ingress_publish_seconds",
            "Time from publish to broker confirm",
            ["outcome"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.rejected = Counter(
            "callpipe_ingress_rejected",
            "Authenticated bodies rejected, by reason (published to {ns}.rejected)",
            ["reason"],
            registry=self.registry,
        )
        self.oversize = Counter(
            "callpipe_ingress_oversize",
            "Bodies over MAX_BODY_BYTES, answered 413 and not published",
            registry=self.registry,
        )
        self.spool_bytes = Gauge(
            "callpipe_ingress_spool_bytes",
            "Bytes of webhooks in the outage spool, waiting for the broker",
            registry=self.registry,
        )
        self.spool_messages = Gauge(
            "callpipe_ingress_spool_messages",
            "Webhooks in the outage spool, answered 200 and waiting for the broker",
            registry=self.registry,
        )
        self.spool_oldest_age = Gauge(
            "callpipe_ingress_spool_oldest_age_seconds",
            "Age of the oldest webhook in the outage spool (0 when empty)",
            registry=self.registry,
        )
        # Children bound once: a request counts with a dict lookup and an `inc()`, not a
        # `labels()` call (a lock and a tuple) each time.
        self.publish_seconds_by_outcome = {
            outcome: self.publish_seconds.labels(outcome) for outcome in PUBLISH_OUTCOMES
        }
        self._requests_by_route_status: dict[tuple[str, int], Counter] = {}

    def count_request(self, route: str, status: int) -> None:
        child = self._requests_by_route_status.get((route, status))
        if child is None:
            child = self.requests.labels(route, str(status))
            self._requests_by_route_status[(route, status)] = child
        child.inc()
