"""The fleet's statements: the publishes owed to the relay, and the sweeper's duties."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from taskq.errors import StoreError
from taskq.model import OwedPublish, Purge, SetAside
from taskq.store._base import StoreBase, _columns, _owed
from taskq.store._callers import _Asyncpg


class FleetStore(StoreBase):
    """Owed publishes (the outbox, the relay, the markers) and the sweeper's chores."""

    # ---------------------------------------------------------------- owed publishes

    async def notify_owed(self, ids: Sequence[uuid.UUID]) -> None:
        """Wake the active relay to publish the owed rows ``ids`` now, not after its grace."""
        async with self._connection() as conn:
            await self._notify(ids, _Asyncpg(conn, self.q))

    async def mark_published(self, published: Sequence[tuple[uuid.UUID, int]]) -> None:
        """Record confirmed publishes of ``(id, generation)``.

        A row whose generation moved on since (a newer publish is owed) is left owed.
        """
        if not published:
            return
        async with self._connection() as conn:
            await conn.execute(self.q["mark_published"], *_columns(sorted(published), 2))

    async def set_aside(
        self, items: Sequence[tuple[uuid.UUID, int, str]], retry_min: float, retry_max: float
    ) -> list[SetAside]:
        """Set owed publishes ``(id, generation, reason)`` aside (see ``set_aside`` SQL);
        returns those set aside."""
        columns = _columns(sorted(items), 3)
        rows = await self._fetch("set_aside", *columns, retry_min, retry_max)
        return [SetAside.from_row(row) for row in rows]

    async def publish_owed(self, grace: float, limit: int) -> list[OwedPublish]:
        """Up to ``limit`` owed publishes older than ``grace`` seconds, oldest first."""
        return _owed(await self._fetch("publish_owed", grace, limit))

    async def owed_among(self, ids: Sequence[uuid.UUID]) -> list[OwedPublish]:
        """The owed publishes (not set aside) among the tasks ``ids``."""
        return _owed(await self._fetch("publish_owed_ids", list(ids)))

    async def set_aside_due(self, limit: int) -> list[OwedPublish]:
        """Up to ``limit`` set-aside publishes whose retry is due, the earliest first."""
        return _owed(await self._fetch("publish_set_aside_due", limit))

    # ---------------------------------------------------------------- sweeper

    async def unfinished_purges(self, older_than: float) -> list[Purge]:
        """Queue purges begun more than ``older_than`` seconds ago and never ended."""
        rows = await self._fetch("purges_unfinished", older_than)
        return [Purge.from_row(row) for row in rows]

    async def begin_purge(self, queue: str) -> int:
        """Record a broker purge of ``queue`` about to start; returns its id."""
        purge_id: int = await self._fetchval("purge_begin", queue)
        return purge_id

    async def end_purge(self, purge_id: int) -> None:
        await self._execute("purge_end", purge_id)

    async def republish_queue(self, queue: str) -> int:
        """Owe again the publishes of ``queue``'s due ENQUEUED tasks; returns how many."""
        return await self._execute("republish_queue", queue)

    async def prune_workers(self, silent_for: float) -> None:
        """Forget workers silent for longer than ``silent_for`` seconds."""
        await self._execute("workers_prune", silent_for)

    async def create_history(self, step: float, ahead: float) -> int | None:
        """Create the task history's partitions of ``step`` seconds up to ``ahead``
        seconds from now; returns how many, or None if a lock was not had in time."""
        try:
            created: int = await self._fetchval("history_create", step, ahead)
        except StoreError as exc:
            if isinstance(exc.__cause__, asyncpg.LockNotAvailableError):
                return None
            raise
        return created

    async def drop_history(self, older_than: float, limit: int) -> tuple[int, int] | None:
        """Drop the oldest partition of the task history if it ended more than
        ``older_than`` seconds ago, and delete up to ``limit`` such events from its
        default partition; returns (partitions dropped, events deleted), or None if a
        lock was not had in time."""
        try:
            row = await self._fetchrow("history_drop", older_than, limit)
        except StoreError as exc:
            if isinstance(exc.__cause__, asyncpg.LockNotAvailableError):
                return None
            raise
        assert row is not None
        return row["dropped"], row["trimmed"]

    async def delete_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` tasks finished more than ``older_than`` seconds ago, and
        their events; returns how many."""
        deleted: int = await self._fetchval("retention_delete", older_than, limit)
        return deleted
