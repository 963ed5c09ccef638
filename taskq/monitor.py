"""What operators watch: ``GET /stats`` and the live ``GET /stream`` of stats and task events.

Stats are computed at most once a second per API process, however many
dashboards stream them: counts by status, queue and type from one grouped
scan of ``tasks``; throughput and latency percentiles of the last minute from
the tasks that finished in it (an index on ``finished_at``); broker depths from
passive queue declares over the API's AMQP connection (no management API
needed). When the broker is unreachable, ``broker.available`` is false.

``/stream`` is Server-Sent Events, written for ``fetch()`` streaming (so the
Authorization header works): an ``event: stats`` every second and an
``event: task`` per task event, read by keyset on ``task_events.id``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from taskq.broker import DepthReader, Link
from taskq.errors import BrokerError, StoreError
from taskq.http import endpoint, json_default, json_response
from taskq.settings import Settings
from taskq.store import Store

STATUSES = ("ENQUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
WINDOW_SECONDS = 60
STATS_MAX_AGE = 1.0
BROKER_TIMEOUT = 2.0
STREAM_STATS_EVERY = 1.0
STREAM_POLL_EVERY = 0.25
STREAM_BATCH = 500
# Events are read again this far behind the last id seen: an event whose
# transaction committed after a later id's is still delivered (once).
STREAM_LOOKBACK = 200


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

    async def stats(self) -> dict[str, Any]:
        """The ``/stats`` body, at most :data:`STATS_MAX_AGE` seconds old."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < STATS_MAX_AGE:
                return self._cached[1]
            body = await self._compute()
            self._cached = (time.monotonic(), body)
            return body

    async def broker_depths(self, queues: list[str]) -> dict[str, tuple[int, int]] | None:
        """``{queue: (messages, consumers)}``, or None if the broker cannot say now."""
        try:
            return await asyncio.wait_for(self.reader.depths(queues), BROKER_TIMEOUT)
        except (BrokerError, TimeoutError):
            return None

    async def _compute(self) -> dict[str, Any]:
        counts = await self.store.fetch("stats_counts")
        [window] = await self.store.fetch("stats_window", WINDOW_SECONDS)
        scheduled = (await self.store.fetch("stats_scheduled"))[0]["count"]
        by_status = dict.fromkeys(STATUSES, 0)
        by_queue: dict[str, dict[str, int]] = {}
        by_type: dict[str, dict[str, int]] = {}
        for row in counts:
            status, n = row["status"], row["n"]
            if not row["no_queue"]:
                by_queue.setdefault(row["queue"], dict.fromkeys(STATUSES, 0))[status] = n
            elif not row["no_type"]:
                by_type.setdefault(row["type"], dict.fromkeys(STATUSES, 0))[status] = n
            else:
                by_status[status] = n
        depths = await self.broker_depths(list(self.kinds))
        queues = {
            name: {"kind": self.kinds[name], "messages": messages, "consumers": consumers}
            for name, (messages, consumers) in (depths or {}).items()
        }
        return {
            "by_status": by_status,
            "scheduled": scheduled,
            "by_queue": by_queue,
            "by_type": by_type,
            "broker": {"available": depths is not None, "queues": queues},
            "throughput": {
                "window_seconds": WINDOW_SECONDS,
                "succeeded_per_second": window["succeeded"] / WINDOW_SECONDS,
                "failed_per_second": window["failed"] / WINDOW_SECONDS,
                "enqueued_per_second": window["enqueued"] / WINDOW_SECONDS,
            },
            "latency": {
                "window_seconds": WINDOW_SECONDS,
                "queue_wait_p50": window["wait_p50"],
                "queue_wait_p95": window["wait_p95"],
                "duration_p50": window["duration_p50"],
                "duration_p95": window["duration_p95"],
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


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event; the data is JSON on one line."""
    body = orjson.dumps(data, default=json_default)
    return b"event: " + event.encode() + b"\ndata: " + body + b"\n\n"


@endpoint("stream")
async def stream(request: Request) -> Response:
    monitor = _monitor(request)
    stopping: asyncio.Event = request.app.state.stopping
    last_id: int = (await monitor.store.fetch("events_last_id"))[0]["last_id"]
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        _events(monitor, stopping, last_id), media_type="text/event-stream", headers=headers
    )


async def _events(monitor: Monitor, stopping: asyncio.Event, last_id: int) -> AsyncIterator[bytes]:
    """Stats every second and task events as they happen, until the server stops.

    Starlette ends the response (cancelling this generator) when the client disconnects.
    """
    start_id = last_id  # events before the stream opened are not sent
    seen: collections.deque[int] = collections.deque(maxlen=STREAM_LOOKBACK * 4)
    seen_set: set[int] = set()
    stats_due = 0.0
    yield b": taskq event stream\n\n"
    while not stopping.is_set():
        try:
            if time.monotonic() >= stats_due:
                stats_due = time.monotonic() + STREAM_STATS_EVERY
                yield sse("stats", await monitor.stats())
            rows = await monitor.store.fetch(
                "events_since", max(0, last_id - STREAM_LOOKBACK), STREAM_BATCH
            )
        except StoreError as exc:
            yield sse("error", {"detail": str(exc)})
            rows = []
        for row in rows:
            if row["id"] <= start_id or row["id"] in seen_set:
                continue
            if len(seen) == seen.maxlen:
                seen_set.discard(seen[0])
            seen.append(row["id"])
            seen_set.add(row["id"])
            last_id = max(last_id, row["id"])
            yield sse(
                "task",
                {
                    "id": row["task_id"],
                    "type": row["type"],
                    "queue": row["queue"],
                    "status": row["status"],
                    "attempt": row["attempt"],
                    "at": row["at"],
                },
            )
        if len(rows) < STREAM_BATCH:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), STREAM_POLL_EVERY)


def routes() -> list[Route]:
    return [
        Route("/stats", get_stats, methods=["GET"]),
        Route("/stream", stream, methods=["GET"]),
    ]
