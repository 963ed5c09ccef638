"""Progress reports of a worker's handlers (``ctx.progress``), written in batches.

A handler may report as often as it likes, from the event loop or from a sync
handler's thread: :meth:`ProgressBuffer.report` only keeps the latest report of
each task. Every ``TASKQ_PROGRESS_INTERVAL`` seconds the worker writes what was
reported meanwhile, one row per task in one statement, to ``task_progress``
(never to the task's own row, which gets no new version for it). So a task
costs at most one progress write per interval, however often it reports.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

from taskq.errors import StoreError
from taskq.store import Store

log = logging.getLogger("taskq.worker")

Report = tuple[uuid.UUID, int, float, str | None]


class ProgressBuffer:
    """The latest unwritten report of each task; safe to use from any thread."""

    def __init__(self) -> None:
        self._pending: dict[uuid.UUID, Report] = {}
        self._lock = threading.Lock()
        #: Rows written, and statements that wrote them (for tests and metrics).
        self.rows_written = 0
        self.writes = 0

    def report(
        self, task_id: uuid.UUID, attempt: int, fraction: float, details: str | None
    ) -> None:
        """Keep a report of ``task_id`` (the latest one wins)."""
        with self._lock:
            self._pending[task_id] = (task_id, attempt, fraction, details)

    def take(self) -> list[Report]:
        """The reports kept since the last take, one per task."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return list(pending.values())

    async def flush(self, store: Store) -> None:
        """Write what was reported since the last flush (a failed write is dropped:
        a later report replaces it anyway)."""
        reports = self.take()
        if not reports:
            return
        try:
            await store.write_progress(reports)
        except StoreError as exc:
            log.warning("could not record the progress of %d tasks: %s", len(reports), exc)
            return
        self.writes += 1
        self.rows_written += len(reports)

    async def flush_every(self, store: Store, interval: float) -> None:
        """Flush every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.flush(store)
