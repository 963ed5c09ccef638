"""Prometheus metrics. Each process keeps its own registry (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """What the API and the Python client count about enqueueing."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.enqueue_total = Counter(
            "taskq_enqueue_total",
            "Enqueue requests by outcome: created, replayed, conflict, invalid.",
            ["type", "queue", "outcome"],
            registry=self.registry,
        )
        self.enqueue_latency = Histogram(
            "taskq_enqueue_latency_seconds",
            "Time to enqueue one task: validation, insert and publish.",
            ["type", "queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "taskq_publish_failures_total",
            "Publishes after a commit that the broker did not confirm (the relay retries them).",
            registry=self.registry,
        )
        self.unpublished = Gauge(
            "taskq_unpublished_tasks",
            "Tasks committed in Postgres whose publish is still owed.",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "taskq_http_requests_total",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
