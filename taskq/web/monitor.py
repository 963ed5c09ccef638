"""What operators watch: ``GET /stats`` (streamed live by taskq.web.stream).

Stats are computed at most once a second per API process, however many
dashboards ask: counts by status, queue and type from one grouped scan of
``tasks``; the paused queues; throughput and latency percentiles of the last minute from the tasks
that finished in it (an index on ``finished_at``); broker depths from passive
queue declares over the API's AMQP connection (no management API needed), read
at most every :data:`DEPTHS_MAX_AGE` seconds for ``/stats``, ``/metrics`` and
``/dlq`` together. When the broker is unreachable, ``broker.available`` is false.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq.amqp.broker import DepthReader, Link
from taskq.errors import BrokerError, StoreError
from taskq.model import QueuePause, Stats
from taskq.settings import Settings
from taskq.store import Store
from taskq.web.http import endpoint, json_response

WINDOW_SECONDS = 60
STATS_MAX_AGE = 1.0
BROKER_TIMEOUT = 2.0
# Broker depths (on /stats, /metrics and /dlq) and the count of unpublished tasks
# (on /metrics) are read at most this often, however often they are asked for.
DEPTHS_MAX_AGE = 2.0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """One queue as the broker reports it."""

    kind: str
    """``work``, ``delay`` or ``dlq``."""
    messages: int
    consumers: int


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """What ``GET /stats`` answers, as a record; :meth:`to_json` is the body."""

    stats: Stats
    """What the database says: counts, the recent window, waiting and paused types."""
    depths: Mapping[str, QueueDepth] | None
    """Every queue by name; None if the broker did not answer."""
    pauses: Sequence[QueuePause] | None
    """The paused queues; None if the database did not say."""
    at: datetime
    window_seconds: int = WINDOW_SECONDS

    def to_json(self) -> dict[str, Any]:
        """The ``/stats`` body (and the stream's ``stats`` event)."""
        counts, window, seconds = self.stats.counts, self.stats.window, self.window_seconds
        return {
            "by_status": counts.by_status,
            "scheduled": self.stats.scheduled,
            "by_queue": counts.by_queue,
            "by_type": counts.by_type,
            "waiting": self.stats.waiting,
            "paused_types": list(self.stats.paused_types),
            "broker": {
                "available": self.depths is not None,
                "queues": {
                    name: {"kind": d.kind, "messages": d.messages, "consumers": d.consumers}
                    for name, d in (self.depths or {}).items()
                },
            },
            "paused_queues": None
            if self.pauses is None
            else {
                p.queue: {"paused_at": p.paused_at, "paused_by": p.paused_by, "reason": p.reason}
                for p in self.pauses
            },
            "throughput": {
                "window_seconds": seconds,
                "succeeded_per_second": window.succeeded / seconds,
                "failed_per_second": window.failed / seconds,
                "enqueued_per_second": window.enqueued / seconds,
            },
            "latency": {
                "window_seconds": seconds,
                "queue_wait_p50": window.wait_p50,
                "queue_wait_p95": window.wait_p95,
                "duration_p50": window.duration_p50,
                "duration_p95": window.duration_p95,
            },
            "at": self.at,
            # The statuses whose by_status count is an estimate (a large table).
            "estimated": list(counts.estimated),
        }


class Monitor:
    """Computes and caches the stats of one API process."""

    def __init__(self, settings: Settings, store: Store, link: Link) -> None:
        self.settings = settings
        self.store = store
        self.reader = DepthReader(link)
        topology = settings.topology()
        names = topology.names
        self.kinds = {names.queue(q): "work" for q in settings.queues}
        self.kinds.update({names.delay(level): "delay" for level in range(topology.levels)})
        self.kinds[names.dlq] = "dlq"
        self._cached: tuple[float, StatsSnapshot] | None = None
        self._lock = asyncio.Lock()
        self._depths: tuple[float, dict[str, tuple[int, int]] | None] = (-1e9, None)
        self._depths_lock = asyncio.Lock()
        self._unpublished: tuple[float, int | None] = (-1e9, None)
        self._unpublished_lock = asyncio.Lock()
        self._pauses: tuple[float, list[QueuePause] | None] = (-1e9, None)
        self._workflows: tuple[float, dict[str, int] | None] = (-1e9, None)

    async def stats(self) -> StatsSnapshot:
        """The stats, at most :data:`STATS_MAX_AGE` seconds old."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < STATS_MAX_AGE:
                return self._cached[1]
            snapshot = await self._compute()
            self._cached = (time.monotonic(), snapshot)
            return snapshot

    async def broker_depths(self) -> dict[str, tuple[int, int]] | None:
        """``{queue: (messages, consumers)}`` of every queue of :attr:`kinds`, at most
        :data:`DEPTHS_MAX_AGE` seconds old; None if the broker could not say."""
        async with self._depths_lock:  # one read at a time; the others take its answer
            if time.monotonic() - self._depths[0] >= DEPTHS_MAX_AGE:
                try:
                    depths = await asyncio.wait_for(
                        self.reader.depths(list(self.kinds)), BROKER_TIMEOUT
                    )
                except (BrokerError, TimeoutError):
                    depths = None
                self._depths = (time.monotonic(), depths)
            return self._depths[1]

    async def unpublished(self) -> int | None:
        """Tasks whose publish is owed, at most :data:`DEPTHS_MAX_AGE` seconds old;
        None if the database could not say."""
        async with self._unpublished_lock:
            if time.monotonic() - self._unpublished[0] >= DEPTHS_MAX_AGE:
                try:
                    count = await asyncio.wait_for(self.store.unpublished_count(), BROKER_TIMEOUT)
                except (StoreError, TimeoutError):
                    count = None
                self._unpublished = (time.monotonic(), count)
            return self._unpublished[1]

    async def pauses(self) -> list[QueuePause] | None:
        """The paused queues, at most :data:`DEPTHS_MAX_AGE` seconds old (a pause or a
        resume through this process is seen at once); None if the database could not say."""
        if time.monotonic() - self._pauses[0] >= DEPTHS_MAX_AGE:
            try:
                pauses = await asyncio.wait_for(self.store.queue_pauses(), BROKER_TIMEOUT)
            except (StoreError, TimeoutError):
                pauses = None
            self._pauses = (time.monotonic(), pauses)
        return self._pauses[1]

    async def workflows(self) -> dict[str, int] | None:
        """Workflows by status, at most :data:`DEPTHS_MAX_AGE` seconds old; None if the
        database could not say."""
        if time.monotonic() - self._workflows[0] >= DEPTHS_MAX_AGE:
            try:
                counts = await asyncio.wait_for(self.store.workflows_by_status(), BROKER_TIMEOUT)
            except (StoreError, TimeoutError):
                counts = None
            self._workflows = (time.monotonic(), counts)
        return self._workflows[1]

    def forget_pauses(self) -> None:
        """Read the pauses again next time (this process paused or resumed a queue)."""
        self._pauses = (-1e9, None)
        self._cached = None

    async def _compute(self) -> StatsSnapshot:
        stats = await self.store.stats(WINDOW_SECONDS)
        depths = await self.broker_depths()
        pauses = await self.pauses()
        return StatsSnapshot(
            stats,
            None
            if depths is None
            else {
                name: QueueDepth(self.kinds[name], messages, consumers)
                for name, (messages, consumers) in depths.items()
            },
            pauses,
            datetime.now(UTC),
        )

    async def close(self) -> None:
        await self.reader.close()


def _monitor(request: Request) -> Monitor:
    monitor: Monitor = request.app.state.monitor
    return monitor


@endpoint("stats")
async def get_stats(request: Request) -> Response:
    return json_response((await _monitor(request).stats()).to_json())


def routes() -> list[Route]:
    return [
        Route("/stats", get_stats, methods=["GET"]),
    ]
