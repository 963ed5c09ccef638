"""Prometheus metrics. Each process keeps its own registry (never the global one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from taskq.model import RequestOutcome

#: The ``kind`` label of the abandoned-handler series: a sync handler's thread, or an
#: async handler's asyncio task that ignores its cancellation.
AbandonedKind = Literal["thread", "task"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """What the API and the Python client count about enqueueing."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.enqueue_total = Counter(
            "taskq_enqueue_total",
            f"Enqueue requests by outcome: {', '.join(RequestOutcome)}.",
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
        self.set_aside = set_aside_counter(self.registry)
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
        # The broker's view, read when /metrics is scraped (see taskq.web.api.metrics).
        self.queue_messages = Gauge(
            "taskq_queue_messages",
            "Ready messages in each broker queue, by kind: work, delay, dlq.",
            ["queue", "kind"],
            registry=self.registry,
        )
        self.queue_consumers = Gauge(
            "taskq_queue_consumers",
            "Consumers of each broker queue, by kind: work, delay, dlq.",
            ["queue", "kind"],
            registry=self.registry,
        )
        # The children of the label sets seen so far (bounded by the registered types,
        # the queues and the routes): labels() costs as much as the rest of a count.
        self._enqueue_children: dict[tuple[str, str, str], Any] = {}
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._http_children: dict[tuple[str, int], Any] = {}
        self.queue_paused = Gauge(
            "taskq_queue_paused",
            "1 while the work queue is paused (POST /queues/{q}/pause), else 0: each of"
            " TASKQ_QUEUES, and any other queue paused.",
            ["queue"],
            registry=self.registry,
        )
        # The gates, read from the database's stats when /metrics is scraped.
        self.type_paused = Gauge(
            "taskq_type_paused",
            "1 for each paused task type (POST /types/{name}/pause).",
            ["type"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "taskq_waiting_tasks",
            "WAITING tasks by type and reason: paused (their type), concurrency (no free slot).",
            ["type", "reason"],
            registry=self.registry,
        )
        self.workflows = Gauge(
            "taskq_workflows",
            "Workflows by status: RUNNING, and by outcome SUCCEEDED, FAILED, CANCELLED"
            " (as retention keeps them).",
            ["status"],
            registry=self.registry,
        )
        self.broker_up = Gauge(
            "taskq_broker_up",
            "1 when the queue depths could be read from the broker at the last scrape, else 0.",
            registry=self.registry,
        )

    def enqueued(
        self, task_type: str, queue: str, outcome: RequestOutcome, seconds: float | None
    ) -> None:
        """Count one enqueue; with ``seconds``, observe how long it took."""
        key = (task_type, queue, outcome)
        counter = self._enqueue_children.get(key)
        if counter is None:  # labels() validates and locks: once per label set
            counter = self._enqueue_children[key] = self.enqueue_total.labels(*key)
        counter.inc()
        if seconds is not None:
            histogram = self._latency_children.get(key[:2])
            if histogram is None:
                histogram = self._latency_children[key[:2]] = self.enqueue_latency.labels(*key[:2])
            histogram.observe(seconds)

    def http_request(self, route: str, status: int) -> None:
        child = self._http_children.get((route, status))
        if child is None:
            child = self._http_children[(route, status)] = self.http_requests.labels(
                route, str(status)
            )
        child.inc()

    def observe_pauses(self, queues: Sequence[str], paused: Sequence[str] | None) -> None:
        """Set ``taskq_queue_paused`` of each of ``queues`` and of each ``paused`` one;
        without an answer (None) the series are dropped rather than left stale."""
        self.queue_paused.clear()
        if paused is None:
            return
        for queue in queues:
            self.queue_paused.labels(queue).set(0)
        for queue in paused:
            self.queue_paused.labels(queue).set(1)

    def observe_queues(self, depths: Sequence[tuple[str, str, int, int]] | None) -> None:
        """Set the queue gauges from ``(queue, kind, messages, consumers)`` rows;
        ``None`` means the broker could not be read.

        Without an answer the queue series are dropped rather than left at stale values.
        """
        self.queue_messages.clear()
        self.queue_consumers.clear()
        self.broker_up.set(0 if depths is None else 1)
        for name, kind, messages, consumers in depths or ():
            self.queue_messages.labels(name, kind).set(messages)
            self.queue_consumers.labels(name, kind).set(consumers)

    def observe_gates(
        self, paused_types: Sequence[str], waiting: Mapping[str, Mapping[str, int]]
    ) -> None:
        """Set the gauges of paused types and waiting tasks (the series of types no
        longer paused or waiting are dropped)."""
        self.type_paused.clear()
        self.waiting.clear()
        for name in paused_types:
            self.type_paused.labels(name).set(1)
        for name, reasons in waiting.items():
            for reason, count in reasons.items():
                self.waiting.labels(name, reason).set(count)

    def observe_workflows(self, counts: Mapping[str, int]) -> None:
        """Set the workflows gauge: every status, 0 for those with none."""
        for status in ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"):
            self.workflows.labels(status).set(counts.get(status, 0))


def set_aside_counter(registry: CollectorRegistry) -> Counter:
    """The relay's count of owed publishes it set aside (the API and workers run a relay)."""
    return Counter(
        "taskq_publishes_set_aside_total",
        "Owed publishes the active relay set aside because they failed for the row alone"
        " (reason: unroutable, delay_too_long, nacked); each task's publish_error says why.",
        ["queue", "reason"],
        registry=registry,
    )


DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class WorkerMetrics:
    """What a worker counts about the tasks it runs (served on its own ``/metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.processed = Counter(
            "taskq_tasks_processed_total",
            "Attempts finished, by outcome: succeeded, retried, failed, given_back, cancelled"
            " (an operator's cancel), stale (the claim was lost, the outcome was not recorded).",
            ["type", "queue", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "taskq_task_duration_seconds",
            "Time a handler ran, per attempt.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "taskq_task_queue_wait_seconds",
            "From the time a task was due (enqueued or retry due) to its start.",
            ["queue"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "taskq_task_retries_total",
            "Attempts that failed and were scheduled again.",
            ["type", "queue"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "taskq_dead_lettered_total",
            "Envelopes sent to the DLQ, by reason: failed, exhausted, missing, invalid.",
            ["queue", "reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "taskq_tasks_in_flight",
            "Tasks this worker has claimed and not yet finished.",
            registry=self.registry,
        )
        self.deliveries = Counter(
            "taskq_deliveries_total",
            "Envelopes received, by claim decision: claimed, terminal, duplicate, early,"
            " limited, exhausted, missing, invalid.",
            ["queue", "decision"],
            registry=self.registry,
        )
        self.handoffs = Counter(
            "taskq_handoffs_total",
            "Tasks this worker's outcome released (a concurrency slot it freed, a workflow"
            " node's success) that it claimed in the same transaction, to run at once"
            " (no publish, no delivery).",
            ["queue"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "taskq_rate_limited_total",
            "Tasks a rate limit made wait: given a later start slot instead of a claim.",
            ["type"],
            registry=self.registry,
        )
        self.held = Gauge(
            "taskq_deliveries_held",
            "Early and limited deliveries this worker holds (unacked) until they are due,"
            " within a second or so.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "taskq_worker_batch_size",
            "Rows per worker statement: deliveries per claim, outcomes per complete/retry/fail.",
            ["statement"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.lease_recoveries = Counter(
            "taskq_lease_recoveries_total",
            "Claims whose lease expired, taken back by the sweeper (workers that died or hung).",
            registry=self.registry,
        )
        self.waiting_repaired = Counter(
            "taskq_waiting_repaired_total",
            "Tasks the sweeper released or cancelled because the release or cancel was"
            " missed: reason concurrency (a slot free), paused (their type resumed),"
            " parents (a workflow node whose parents succeeded) or workflow_cancel"
            " (a workflow node that can no longer run).",
            ["reason"],
            registry=self.registry,
        )
        self.retention_deleted = Counter(
            "taskq_retention_deleted_total",
            "Terminal tasks (with their events) deleted because they finished longer ago"
            " than TASKQ_RETENTION.",
            registry=self.registry,
        )
        self.set_aside = set_aside_counter(self.registry)
        self.schedule_fires = Counter(
            "taskq_schedule_fires_total",
            "Tasks enqueued by schedules (counted by the active sweeper's worker).",
            ["schedule"],
            registry=self.registry,
        )
        self.schedule_skipped = Counter(
            "taskq_schedule_skipped_total",
            "Schedule fires skipped: missed ones their catch-up policy skips, and those due"
            " while the previous fire's task ran (overlap=skip).",
            ["schedule"],
            registry=self.registry,
        )
        self.schedule_lateness = Histogram(
            "taskq_schedule_lateness_seconds",
            "From a schedule's fire time to the commit of its task's enqueue.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=self.registry,
        )
        self.abandoned = Gauge(
            "taskq_abandoned_handlers_running",
            "Handlers the worker stopped waiting for (their timeout, a cancel, a shutdown) that"
            " are still running: kind=thread (a sync handler; Python cannot stop a thread) or"
            " kind=task (an async handler that ignores its cancellation).",
            ["kind"],
            registry=self.registry,
        )
        self.abandoned_total = Counter(
            "taskq_abandoned_handlers_total",
            "Handlers abandoned: the attempt ended without them, they ran on (kind: thread, task).",
            ["kind"],
            registry=self.registry,
        )
        for kind in get_args(AbandonedKind):
            self.abandoned.labels(kind)
            self.abandoned_total.labels(kind)
        self.queue_paused = Gauge(
            "taskq_queue_paused",
            "1 while this worker does not consume the work queue because it is paused, else 0"
            " (each queue it consumes).",
            ["queue"],
            registry=self.registry,
        )
        self.paused_given_back = Counter(
            "taskq_paused_given_back_total",
            "Prefetched envelopes of a paused queue given back to the broker unclaimed.",
            ["queue"],
            registry=self.registry,
        )
        self.republished = Counter(
            "taskq_republished_total",
            "Overdue ENQUEUED tasks published again because their work queue was empty.",
            ["queue"],
            registry=self.registry,
        )
