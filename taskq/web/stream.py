"""``GET /stream``: Server-Sent Events of stats and task events, from one poller per process.

Written for ``fetch()`` streaming (so the Authorization header works): an
``event: stats`` every second, an ``event: task`` per task event and an
``event: progress`` per progress report a worker wrote. However many
streams are open, one poller per API process reads the events (by keyset on
``task_events.id``) and the stats, and hands each to every open stream; it runs
only while a stream is open. At most ``TASKQ_MAX_STREAMS`` streams are open per
process (429 beyond). A stream that falls ``BACKLOG`` events behind (a client that
does not read) is ended with an ``error`` event; the dashboard reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from taskq.errors import Problem, StoreError
from taskq.model import ProgressEvent, StreamEvent
from taskq.service import Service
from taskq.web.http import endpoint, json_default
from taskq.web.monitor import Monitor

log = logging.getLogger("taskq.stream")
STATS_EVERY = 1.0
POLL_EVERY = 0.25
BATCH = 500
BACKLOG = 2000
# Events are read again this far behind the last id seen: an event whose
# transaction committed after a later id's is still delivered (once).
LOOKBACK = 200


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event; the data is JSON on one line."""
    body = orjson.dumps(data, default=json_default)
    return b"event: " + event.encode() + b"\ndata: " + body + b"\n\n"


_BEHIND = sse("error", {"detail": "this stream fell behind; reconnect"})


class Hub(Service):
    """The poller of one API process and the streams it feeds.

    Its poller runs while streams are open; :meth:`stop` ends them all.
    """

    name = "taskq-stream"

    def __init__(self, monitor: Monitor, stopping: asyncio.Event, max_streams: int) -> None:
        self.monitor = monitor
        self.stopping = stopping
        self.max_streams = max_streams
        self._streams: set[asyncio.Queue[bytes | None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._stats: bytes | None = None
        self._last_id = 0

    @property
    def open(self) -> int:
        return len(self._streams)

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        """A queue of the events from now on (None: the stream ends).

        Raises:
            Problem: 429 when ``max_streams`` are open.
        """
        if len(self._streams) >= self.max_streams:
            raise Problem(
                429,
                "Too many streams",
                f"this API process serves at most {self.max_streams} streams"
                " (TASKQ_MAX_STREAMS); try again later",
                headers={"Retry-After": "5"},
            )
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(BACKLOG)
        self._streams.add(queue)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="taskq-stream-poller")
        elif self._stats is not None:
            queue.put_nowait(self._stats)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._streams.discard(queue)

    def _send(self, message: bytes | None) -> None:
        for queue in list(self._streams):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # its client does not read: end its stream
                self._streams.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(_BEHIND)
                queue.put_nowait(None)

    async def _poll(self) -> None:
        store = self.monitor.store
        events = _Keyset()
        progress = _Keyset()  # by task_progress.seq, which every write takes anew
        stats_due = 0.0
        while self._streams and not self.stopping.is_set():
            rows: list[StreamEvent] = []
            reports: list[ProgressEvent] = []
            try:
                if events.start is None:
                    events.begin(await store.last_event_id())
                    progress.begin(await store.last_progress_seq())
                    self._last_id = events.last
                if time.monotonic() >= stats_due:
                    stats_due = time.monotonic() + STATS_EVERY
                    self._stats = sse("stats", (await self.monitor.stats()).to_json())
                    self._send(self._stats)
                rows = await store.events_since(events.after(), BATCH)
                reports = await store.progress_since(progress.after(), BATCH)
            except StoreError as exc:
                log.warning("the event stream cannot read the database: %s", exc)
                self._send(sse("error", {"detail": "the database did not answer"}))
            for row in rows:
                if events.new(row.id):
                    self._send(sse("task", _task_event(row)))
            self._last_id = events.last
            for report in reports:
                if progress.new(report.seq):
                    self._send(sse("progress", _progress_event(report)))
            if len(rows) < BATCH and len(reports) < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), POLL_EVERY)
        self._stats = None
        if self.stopping.is_set():
            self._send(None)

    async def _stop(self, timeout: float) -> None:
        """End every stream and stop the poller (which starts with the first stream)."""
        self._send(None)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller


class _Keyset:
    """Where a poll of rows by an ascending key stands, and the keys sent already.

    Rows are read again :data:`LOOKBACK` keys behind the last one seen: a row whose
    transaction committed after a later key's is still sent (once).
    """

    def __init__(self) -> None:
        self.start: int | None = None  # rows before the poller started are not sent
        self.last = 0
        self._seen: collections.deque[int] = collections.deque(maxlen=LOOKBACK * 4)
        self._seen_set: set[int] = set()

    def begin(self, last: int) -> None:
        self.start = self.last = last

    def after(self) -> int:
        return max(0, self.last - LOOKBACK)

    def new(self, key: int) -> bool:
        """Whether the row ``key`` is to be sent (it is then remembered as sent)."""
        if key <= (self.start or 0) or key in self._seen_set:
            return False
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(key)
        self._seen_set.add(key)
        self.last = max(self.last, key)
        return True


def _progress_event(report: ProgressEvent) -> dict[str, Any]:
    details = orjson.loads(report.details) if report.details is not None else None
    return {**_about(report), "fraction": report.fraction, "details": details}


def _task_event(event: StreamEvent) -> dict[str, Any]:
    return {**_about(event), "status": event.status}


def _about(event: StreamEvent | ProgressEvent) -> dict[str, Any]:
    """What every event of the stream says of its task."""
    fields = ("type", "queue", "attempt", "at")
    return {"id": event.task_id, **{name: getattr(event, name) for name in fields}}


@endpoint("stream")
async def stream(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    queue = hub.subscribe()
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(hub, queue), media_type="text/event-stream", headers=headers)


async def _events(hub: Hub, queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    """What the poller hands this stream, until the server stops or the stream falls behind.

    Starlette ends the response (cancelling this generator) when the client disconnects.
    """
    try:
        yield b": taskq event stream\n\n"
        while (message := await queue.get()) is not None:
            yield message
    finally:
        hub.unsubscribe(queue)
