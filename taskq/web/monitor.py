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
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq.amqp.broker import DepthReader, Link
from taskq.errors import BrokerError, StoreError
from taskq.model import QueuePause
from taskq.settings import Settings
from taskq.store import Store
from taskq.web.http import endpoint, json_response

WINDOW_SECONDS = 60
STATS_MAX_AGE = 1.0
BROKER_TIMEOUT = 2.0
# Broker depths (on /stats, /metrics and /dlq) and the count of unpublished tasks
# (on /metrics) are read at most this often, however often they are asked for.
DEPTHS_MAX_AGE = 2.0


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
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._depths: tuple[float, dict[str, tuple[int, int]] | None] = (-1e9, None)
        self._depths_lock = asyncio.Lock()
        self._unpublished: tuple[float, int | None] = (-1e9, None)
        self._unpublished_lock = asyncio.Lock()
        self._pauses: tuple[float, list[QueuePause] | None] = (-1e9, None)

    async def stats(self) -> dict[str, Any]:
        """The ``/stats`` body, at most :data:`STATS_MAX_AGE` seconds old."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < STATS_MAX_AGE:
                return self._cached[1]
            body = await self._compute()
            self._cached = (time.monotonic(), body)
            return body

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

    def forget_pauses(self) -> None:
        """Read the pauses again next time (this process paused or resumed a queue)."""
        self._pauses = (-1e9, None)
        self._cached = None

    async def _compute(self) -> dict[str, Any]:
        stats = await self.store.stats(WINDOW_SECONDS)
        counts, window = stats.counts, stats.window
        depths = await self.broker_depths()
        pauses = await self.pauses()
        queues = {
            name: {"kind": self.kinds[name], "messages": messages, "consumers": consumers}
            for name, (messages, consumers) in (depths or {}).items()
        }
        return {
            "by_status": counts.by_status,
            "scheduled": stats.scheduled,
            "by_queue": counts.by_queue,
            "by_type": counts.by_type,
            "waiting": stats.waiting,
            "paused_types": list(stats.paused_types),
            "broker": {"available": depths is not None, "queues": queues},
            "paused_queues": None
            if pauses is None
            else {
                p.queue: {"paused_at": p.paused_at, "paused_by": p.paused_by, "reason": p.reason}
                for p in pauses
            },
            "throughput": {
                "window_seconds": WINDOW_SECONDS,
                "succeeded_per_second": window.succeeded / WINDOW_SECONDS,
                "failed_per_second": window.failed / WINDOW_SECONDS,
                "enqueued_per_second": window.enqueued / WINDOW_SECONDS,
            },
            "latency": {
                "window_seconds": WINDOW_SECONDS,
                "queue_wait_p50": window.wait_p50,
                "queue_wait_p95": window.wait_p95,
                "duration_p50": window.duration_p50,
                "duration_p95": window.duration_p95,
            },
            "at": datetime.now(UTC),
        }

    async def close(self) -> None:
        await self.reader.close()


def _monitor(request: Request) -> Monitor:
    monitor: Monitor = request.app.state.monitor
    return monitor


@endpoint("stats")
async def get_stats(request: Request) -> Response:
    return json_response(await _monitor(request).stats())


def routes() -> list[Route]:
    return [
        Route("/stats", get_stats, methods=["GET"]),
    ]
