"""Reads: one task and its events, the stats, the workers, the events and progress streamed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from taskq.model import (
    ProgressEvent,
    Stats,
    StatusCounts,
    StreamEvent,
    TaskEvent,
    TaskRecord,
    Throughput,
    WorkerRecord,
)
from taskq.store._types import TypesStore

# /stats counts the tasks of a terminal status exactly while the planner estimates
# fewer than this many; above, it takes the estimate (docs/scaling.md).
STATS_EXACT_BELOW = 10_000
TERMINAL_STATUS_NAMES = ("SUCCEEDED", "FAILED", "CANCELLED")


class ReadsStore(TypesStore):
    """Reading tasks, and monitoring the system."""

    # ---------------------------------------------------------------- reading

    async def task(self, task_id: uuid.UUID) -> TaskRecord | None:
        row = await self._fetchrow("task_get", task_id)
        return None if row is None else TaskRecord.from_detail_row(row)

    async def request_wait(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Mark tasks as waited for (their end sends a NOTIFY on :attr:`finished_channel`).

        Returns the ids marked: those still ENQUEUED or RUNNING. The others have
        ended or do not exist; read them.
        """
        return {row["id"] for row in await self._fetch("wait_request", list(ids))}

    async def task_events(self, task_id: uuid.UUID) -> list[TaskEvent]:
        return [TaskEvent.from_row(row) for row in await self._fetch("task_events", task_id)]

    async def unpublished_count(self) -> int:
        async with self._connection() as conn:
            count: int = await conn.fetchval(self.q["unpublished_count"])
            return count

    # ---------------------------------------------------------------- monitoring

    async def stats(self, window_seconds: float, exact_below: int = STATS_EXACT_BELOW) -> Stats:
        """Counts by status, queue and type; scheduled tasks; the recent window's
        throughput; waiting tasks by type and reason; the paused types.

        While the planner estimates fewer than ``exact_below`` tasks in each terminal
        status, every count is exact (one scan of the table). A terminal status
        estimated at ``exact_below`` or more is counted by that estimate
        (``counts.estimated``) and left out of the counts by queue and by type; the
        others are counted exactly, each through its partial index: the cost of
        ``/stats`` then follows the live tasks, not the history retained."""
        rows = await self._fetch("stats_status_estimates", self.schema)
        estimates = {row["status"]: row["n"] for row in rows}
        large = {
            status: estimates[status]
            for status in TERMINAL_STATUS_NAMES
            if estimates.get(status, 0) >= exact_below
        }
        if not large:
            counts = StatusCounts.from_rows(await self._fetch("stats_counts"))
        else:
            others = await self._fetch("stats_counts_others", sorted(large))
            counts = StatusCounts.from_rows(others, estimated=large)
        window = await self._fetchrow("stats_window", window_seconds)
        scheduled: int = await self._fetchval("stats_scheduled")
        waiting: dict[str, dict[str, int]] = {}
        for row in await self._fetch("stats_waiting"):
            waiting.setdefault(row["type"], {})[row["wait_reason"]] = row["n"]
        paused = [t.name for t in await self.task_types() if t.paused]
        assert window is not None
        return Stats(counts, scheduled, Throughput.from_row(window), waiting, paused)

    async def workers(self, missed_heartbeats: int) -> list[WorkerRecord]:
        """The workers registry; alive: missed fewer than ``missed_heartbeats`` heartbeats."""
        rows = await self._fetch("workers_list", missed_heartbeats)
        return [WorkerRecord.from_row(row) for row in rows]

    async def last_event_id(self) -> int:
        last: int = await self._fetchval("events_last_id")
        return last

    async def last_progress_seq(self) -> int:
        last: int = await self._fetchval("progress_last_seq")
        return last

    async def progress_since(self, after_seq: int, limit: int) -> list[ProgressEvent]:
        """Up to ``limit`` progress reports written after ``after_seq``, oldest first."""
        rows = await self._fetch("progress_since", after_seq, limit)
        return [ProgressEvent.from_row(row) for row in rows]

    async def events_since(self, after_id: int, limit: int) -> list[StreamEvent]:
        """Up to ``limit`` task events of any task after ``after_id``, oldest first."""
        rows = await self._fetch("events_since", after_id, limit)
        return [StreamEvent.from_row(row) for row in rows]
