"""The operators' statements: listings, cancels, retries and replays, queue purges and pauses."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from taskq.errors import StoreError
from taskq.model import Cursor, OwedPublish, QueuePause, TaskFilter, TaskRecord, TaskStatus
from taskq.store._base import StoreBase, _owed


class AdminStore(StoreBase):
    """What operators do to tasks and queues."""

    # ---------------------------------------------------------------- admin

    async def list_tasks(
        self,
        filters: TaskFilter,
        cursor: Cursor | None,
        limit: int,
        *,
        with_payload: bool = False,
        with_result: bool = False,
    ) -> list[TaskRecord]:
        """Tasks matching ``filters``, newest first, after ``cursor`` (on created_at, id).

        Payloads and results are read only when asked for (each can be a MiB).
        """
        statuses = None if filters.statuses is None else sorted(str(s) for s in filters.statuses)
        rows = await self._fetch(
            "tasks_list",
            statuses,
            filters.type,
            filters.queue,
            filters.created_after,
            filters.created_before,
            filters.scheduled,
            *_after(cursor),
            limit,
            with_payload,
            with_result,
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def list_dead_letters(
        self,
        task_type: str | None,
        queue: str | None,
        cursor: Cursor | None,
        limit: int,
        *,
        with_payload: bool = False,
        with_result: bool = False,
    ) -> list[TaskRecord]:
        """FAILED tasks, newest finished first, after ``cursor`` (on finished_at, id)."""
        rows = await self._fetch(
            "dlq_list",
            task_type,
            queue,
            *_after(cursor),
            limit,
            with_payload,
            with_result,
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def pick_dead_letters(
        self,
        task_type: str | None,
        queue: str | None,
        ids: Sequence[uuid.UUID] | None,
        limit: int,
    ) -> list[uuid.UUID]:
        """Up to ``limit`` FAILED tasks to replay, oldest failure first; None matches all."""
        rows = await self._fetch(
            "dlq_pick", task_type, queue, None if ids is None else list(ids), limit
        )
        return [row["id"] for row in rows]

    async def cancel(
        self, task_id: uuid.UUID, *, actor: str, reason: str | None
    ) -> TaskStatus | None:
        """An operator's cancel (see ``cancel`` SQL): the task's status after it,
        CANCELLED or RUNNING (a cancel request), or None if it was neither ENQUEUED
        nor RUNNING (nothing changed)."""
        rows = await self._as_operator("cancel", actor, reason, "cancel", task_id)
        return TaskStatus(rows[0]["status"]) if rows else None

    async def requeue(
        self,
        ids: Sequence[uuid.UUID],
        statuses: Sequence[TaskStatus],
        *,
        action: str,
        actor: str,
        reason: str | None,
    ) -> list[OwedPublish]:
        """ENQUEUE the tasks ``ids`` that are in ``statuses`` again, with fresh attempts
        (an operator's retry or replay); returns them with the publish each owes."""
        rows = await self._as_operator(
            action, actor, reason, "requeue", list(ids), [str(s) for s in statuses]
        )
        return _owed(rows)

    async def cancel_enqueued(
        self, queue: str, *, limit: int, after: uuid.UUID | None, actor: str, reason: str
    ) -> list[uuid.UUID]:
        """A queue purge's step: cancel up to ``limit`` ENQUEUED tasks of ``queue`` whose
        id is above ``after``, in id order; returns their ids."""
        rows = await self._as_operator(
            "purge", actor, reason, "queue_cancel_enqueued", queue, limit, after
        )
        return [row["id"] for row in rows]

    # ---------------------------------------------------------------- queue pauses

    async def pause_queue(
        self, queue: str, *, paused_by: str, reason: str | None
    ) -> tuple[QueuePause, bool]:
        """Pause work queue ``queue``; returns its pause, and whether it is new (a queue
        paused already keeps its pause). A new pause notifies the workers."""
        for _ in range(5):
            row = await self._fetchrow("queue_pause", queue, paused_by, reason, self.queues_channel)
            if row is not None:
                return QueuePause.from_row(row), True
            # Paused already, unless a resume deleted the row since the insert met it.
            row = await self._fetchrow("queue_pause_get", queue)
            if row is not None:
                return QueuePause.from_row(row), False
        raise StoreError(f"queue {queue!r} kept being paused and resumed meanwhile; try again")

    async def resume_queue(self, queue: str) -> QueuePause | None:
        """Resume work queue ``queue``; returns the pause it ended (None: it was not
        paused). Notifies the workers if it was."""
        row = await self._fetchrow("queue_resume", queue, self.queues_channel)
        return None if row is None else QueuePause.from_row(row)

    async def queue_pauses(
        self, connection: asyncpg.Connection | None = None, timeout: float | None = None
    ) -> list[QueuePause]:
        """Every paused queue, by name; on ``connection`` (a worker's listening
        connection, which the read then also checks) if given, within ``timeout``."""
        async with self._connection(connection) as conn:
            rows = await conn.fetch(self.q["queue_pauses"], timeout=timeout)
        return [QueuePause.from_row(row) for row in rows]


def _after(cursor: Cursor | None) -> tuple[datetime | None, uuid.UUID | None]:
    """A listing's keyset parameters: the sort time and id to go on after (None: the start)."""
    return (None, None) if cursor is None else (cursor.at, cursor.id)
