"""Schedules: the sweeper's duty that enqueues the fires of the schedules that are due.

A schedule fires at the times of a cron expression in a time zone
(:mod:`taskq.cron`) or every so many seconds (at the multiples of that interval
since the Unix epoch, so that every process agrees on them). Its row holds the
next fire not yet enqueued. On each pass the active sweeper reads the schedules
whose next fire is due by the database's clock, plans each one
(:func:`plan`: which due fires to enqueue, which to skip, the next fire after
now) and enqueues the planned fires with the move to the next fire in one
statement (``schedule_fire``), which does nothing if another sweeper moved the
schedule on meanwhile. Each fire's idempotency key names the schedule and the
fire time: a fire is enqueued once, whatever fails and restarts.

Missed fires are those due before the latest due fire: no sweeper ran when
they came (the fleet was down, a leader froze). The schedule's ``catch_up``
says what becomes of them: ``skip`` (and the latest too, if it is more than
:data:`GRACE` seconds late), ``once`` (one task, for the latest), or ``all`` (a
task each, the latest ``catch_up_limit`` of them). ``overlap=skip`` skips the
fires due while the task of the previous fire is not finished.
"""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from taskq import cron
from taskq.amqp.broker import Publisher
from taskq.errors import CronProblem
from taskq.fleet.relay import publish_owed
from taskq.metrics import WorkerMetrics
from taskq.model import CatchUp, Overlap, ScheduleFire, ScheduleRecord
from taskq.store import Store

log = logging.getLogger("taskq.scheduler")

# A fire at most this many seconds late is on time: catch_up=skip still fires it.
GRACE = 60.0
# The most due fires one plan enumerates; beyond that (a per-second schedule
# after a day without a sweeper) the rest are skipped whatever the policy.
MAX_DUE = 10_000
# Schedules fired per pass at most; the rest wait for the next pass.
BATCH = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Timetable(Protocol):
    """When a schedule fires."""

    def fires(self, after: datetime) -> Iterator[datetime]:
        """The fires strictly after ``after`` (aware), in order, as aware UTC times."""
        ...


@dataclass(frozen=True, slots=True)
class Cron:
    """The fires of a cron expression in a time zone."""

    expression: cron.Cron
    zone: str

    def fires(self, after: datetime) -> Iterator[datetime]:
        return self.expression.fires(after, cron.zone(self.zone))


@dataclass(frozen=True, slots=True)
class Every:
    """A fire every ``seconds`` seconds: at the multiples of it since the Unix epoch."""

    seconds: float

    def fires(self, after: datetime) -> Iterator[datetime]:
        elapsed = (after - _EPOCH).total_seconds()
        n = math.floor(elapsed / self.seconds) + 1
        for k in itertools.count(n):
            yield _EPOCH + timedelta(seconds=k * self.seconds)


def timetable(
    *, cron_expression: str | None, timezone: str, every_seconds: float | None
) -> Timetable:
    """The timetable of a cron expression in ``timezone``, or of an interval.

    Raises:
        CronProblem: the expression or the zone is refused.
    """
    if cron_expression is not None:
        cron.zone(timezone)  # refuse an unknown zone now, not at the first fire
        return Cron(cron.parse(cron_expression), timezone)
    if every_seconds is None:
        raise CronProblem("", "a schedule needs a cron expression or an interval")
    return Every(every_seconds)


def timetable_of(schedule: ScheduleRecord) -> Timetable:
    return timetable(
        cron_expression=schedule.cron,
        timezone=schedule.timezone,
        every_seconds=schedule.every_seconds,
    )


def next_fire(table: Timetable, after: datetime) -> datetime:
    """The first fire strictly after ``after``."""
    return next(table.fires(after))


@dataclass(frozen=True, slots=True)
class Plan:
    """What one pass does with a due schedule."""

    fires: list[datetime]  # to enqueue now, oldest first
    skipped: int
    next_fire_at: datetime  # the first fire after now


def plan(schedule: ScheduleRecord, table: Timetable, now: datetime) -> Plan:
    """Which of a due schedule's fires to enqueue at ``now`` (see the module's docstring)."""
    due = [schedule.next_fire_at]
    upcoming = table.fires(schedule.next_fire_at)
    following = next(upcoming)
    while following <= now and len(due) < MAX_DUE:
        due.append(following)
        following = next(upcoming)
    beyond = 0
    if following <= now:  # more than MAX_DUE were due: the rest are skipped
        beyond = 1
        following = next_fire(table, now)
    latest = due[-1]
    if schedule.overlap == Overlap.SKIP and not schedule.finished_previous:
        fires: list[datetime] = []
    elif schedule.catch_up == CatchUp.SKIP:
        fires = [latest] if (now - latest).total_seconds() <= GRACE else []
    elif schedule.catch_up == CatchUp.ONCE:
        fires = [latest]
    else:
        fires = due[-schedule.catch_up_limit :]
    if schedule.overlap == Overlap.SKIP:
        fires = fires[-1:]  # the fires of one pass would overlap each other
    return Plan(fires, len(due) - len(fires) + beyond, following)


def idempotency_key(name: str, fire: datetime) -> str:
    """The key of a fire's task: the schedule and the fire time, in UTC."""
    return f"schedule:{name}:{fire.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


class Scheduler:
    """Enqueues the fires of due schedules; a duty of the active sweeper.

    Args:
        store: the database.
        publisher: publishes the tasks of the fires (those it fails to publish
            stay owed, and the relay publishes them).
        metrics: counts fires and skips and observes lateness, if given.
        batch: the most schedules fired per pass.
        on_next: called after each pass with the seconds until the next fire of any
            schedule (None: there is none), so that the next pass comes at that time
            rather than at the sweeper's next interval.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        metrics: WorkerMetrics | None = None,
        batch: int = BATCH,
        on_next: Callable[[float | None], object] | None = None,
    ) -> None:
        self.on_next = on_next
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.batch = batch

    async def fire_due(self) -> int:
        """Fire every due schedule (up to ``batch``); returns how many tasks it enqueued."""
        now, schedules = await self.store.due_schedules(self.batch)
        total = 0
        for schedule in schedules:
            try:
                table = timetable_of(schedule)
            except CronProblem as exc:  # e.g. its time zone left the system's tz database
                log.error("schedule %s cannot fire: %s", schedule.name, exc)
                continue
            total += await self._fire(schedule, plan(schedule, table, now), now)
        if self.on_next is not None:
            self.on_next(await self.store.seconds_to_next_fire())
        return total

    async def trigger(self, schedule: ScheduleRecord) -> uuid.UUID | None:
        """Fire a schedule now, outside its timetable (paused or not); its next fire
        stays. Returns the task's id, or None if the schedule moved on meanwhile
        (fire it again) or its type is unknown or disabled (its last_error says so)."""
        task_id = uuid.uuid4()
        created = await self.store.fire_schedule(
            ScheduleFire(
                name=schedule.name,
                expected_next_fire_at=schedule.next_fire_at,
                manual=True,
                ids=[task_id],
                idempotency_keys=[f"schedule:{schedule.name}:trigger:{task_id}"],
                next_fire_at=schedule.next_fire_at,
                last_fire_at=None,
                skipped=0,
                fingerprint=_fingerprint(schedule.name),
            )
        )
        await publish_owed(self.store, self.publisher, created)
        return created[0].id if created else None

    async def _fire(self, schedule: ScheduleRecord, planned: Plan, now: datetime) -> int:
        ids = [uuid.uuid4() for _ in planned.fires]
        created = await self.store.fire_schedule(
            ScheduleFire(
                name=schedule.name,
                expected_next_fire_at=schedule.next_fire_at,
                manual=False,
                ids=ids,
                idempotency_keys=[idempotency_key(schedule.name, f) for f in planned.fires],
                next_fire_at=planned.next_fire_at,
                last_fire_at=planned.fires[-1] if planned.fires else None,
                skipped=planned.skipped,
                fingerprint=_fingerprint(schedule.name),
            )
        )
        if planned.skipped:
            log.warning(
                "schedule %s: %d fires skipped (catch_up=%s, overlap=%s)",
                schedule.name,
                planned.skipped,
                schedule.catch_up,
                schedule.overlap,
            )
        if self.metrics is not None:
            self.metrics.schedule_skipped.labels(schedule.name).inc(planned.skipped)
            if created:
                self.metrics.schedule_fires.labels(schedule.name).inc(len(created))
                for fire in planned.fires[-len(created) :]:
                    self.metrics.schedule_lateness.observe(max(0.0, (now - fire).total_seconds()))
        await publish_owed(
            self.store,
            self.publisher,
            created,
            set_aside=self.metrics.set_aside if self.metrics is not None else None,
        )
        return len(created)


def _fingerprint(name: str) -> str:
    return f"schedule:{name}"
