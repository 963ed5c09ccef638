"""Schedules: their definitions, and their fires (see :mod:`taskq.fleet.scheduler`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from taskq.errors import TooManySchedules
from taskq.model import OwedPublish, ScheduleFire, ScheduleRecord, ScheduleSpec
from taskq.store._base import StoreBase, _owed

# Serialises the writers of schedules for the check against TASKQ_MAX_SCHEDULES: "sched".
SCHEDULES_LOCK_KEY = 0x7363686564


class SchedulesStore(StoreBase):
    """Schedules and their fires."""

    async def put_schedule(
        self, spec: ScheduleSpec, next_fire_at: datetime, *, max_schedules: int
    ) -> ScheduleRecord:
        """Create or replace a schedule; a replacement with the same timing keeps its
        next fire (``created`` on the record says which it was).

        Raises:
            TooManySchedules: a new schedule would pass ``max_schedules``.
        """
        async with self._connection() as connection, connection.transaction():
            # The advisory lock of types_lock, under a key of its own.
            await connection.execute(self.q["types_lock"], SCHEDULES_LOCK_KEY)
            if await connection.fetchval(self.q["schedules_count_with"], spec.name) > max_schedules:
                raise TooManySchedules(max_schedules)
            row = await connection.fetchrow(
                self.q["schedule_put"], spec.name, spec.cron, spec.timezone, spec.every_seconds,
                spec.type, spec.payload, spec.queue, spec.catch_up, spec.catch_up_limit,
                spec.overlap, spec.source, next_fire_at,
            )  # fmt: skip
        assert row is not None  # an upsert returns its row
        return ScheduleRecord.from_row(row)

    async def schedule(self, name: str) -> ScheduleRecord | None:
        row = await self._fetchrow("schedule_get", name)
        return None if row is None else ScheduleRecord.from_row(row)

    async def schedules(self, after: str, limit: int) -> list[ScheduleRecord]:
        """Schedules in name order, after the name ``after`` ("" for the first page)."""
        rows = await self._fetch("schedules_list", after, limit)
        return [ScheduleRecord.from_row(r) for r in rows]

    async def count_schedules(self) -> int:
        count: int = await self._fetchval("schedules_count")
        return count

    async def delete_code_schedules(self, types: Sequence[str], keep: Sequence[str]) -> list[str]:
        """Delete the schedules declared in code (``source`` code) for ``types`` whose
        names are not in ``keep``; returns their names."""
        rows = await self._fetch("schedules_delete_code", list(types), list(keep))
        return [row["name"] for row in rows]

    async def delete_schedule(self, name: str) -> bool:
        return await self._execute("schedule_delete", name) > 0

    async def pause_schedule(
        self, name: str, *, paused: bool, next_fire_at: datetime | None = None
    ) -> ScheduleRecord | None:
        """Pause or resume; resuming moves the next fire to ``next_fire_at``."""
        row = await self._fetchrow("schedule_pause", name, paused, next_fire_at)
        return None if row is None else ScheduleRecord.from_row(row)

    async def database_now(self) -> datetime:
        """The database's clock, the one schedules' fires are compared with."""
        now: datetime = await self._fetchval("db_now")
        return now

    async def due_schedules(self, limit: int) -> tuple[datetime, list[ScheduleRecord]]:
        """The database's clock, and the schedules due by it (at most ``limit``)."""
        rows = await self._fetch("schedules_due", limit)
        if not rows:
            return await self.database_now(), []
        return rows[0]["now"], [ScheduleRecord.from_row(r) for r in rows]

    async def seconds_to_next_fire(self) -> float | None:
        """Seconds until the next fire of a schedule that is not paused (None: none)."""
        seconds: float | None = await self._fetchval("schedules_next")
        return seconds

    async def fire_schedule(self, fire: ScheduleFire) -> list[OwedPublish]:
        """Enqueue a schedule's fires and move it on, if its next fire is still
        ``fire.expected_next_fire_at``; returns the tasks created, owed their publish."""
        return _owed(
            await self._fetch(
                "schedule_fire", fire.name, fire.expected_next_fire_at, fire.manual, fire.ids,
                fire.idempotency_keys, fire.next_fire_at, fire.last_fire_at, fire.skipped,
                fire.fingerprint,
            )
        )  # fmt: skip
