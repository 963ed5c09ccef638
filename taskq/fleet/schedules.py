"""What a schedule is: its definition as ``PUT /schedules/{name}`` takes it (the same
fields a handler's ``schedule=`` declares), checked into a :class:`ScheduleSpec`, and
a schedule as the API shows it.

The checks here need no database; the API also checks that the type exists and
is enabled, that the queue is one of ``TASKQ_QUEUES`` and the payload against the
type's schema, as an enqueue would (:mod:`taskq.web.schedules`).
"""

from __future__ import annotations

import itertools
import re
import uuid
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from taskq._utils import field_errors, integral, parse_duration
from taskq.amqp.broker import Publisher
from taskq.errors import CronProblem, FieldError, InvalidRequest, TaskqError
from taskq.fleet.scheduler import Scheduler, Timetable, next_fire, timetable, timetable_of
from taskq.model import CatchUp, Overlap, ScheduleRecord, ScheduleSpec
from taskq.store import Store

# As task type names.
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
MIN_EVERY = 1.0
MAX_EVERY = 366 * 86400.0
# The fires after the next that the API shows.
UPCOMING = 3


class ScheduleBody(BaseModel):
    """The body of ``PUT /schedules/{name}``: the whole definition (omitted fields take
    defaults). Exactly one of ``cron`` and ``every``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cron: str | None = Field(
        None, max_length=200, description="A five-field cron expression, or @daily and the like."
    )
    every: float | str | None = Field(
        None, description="Instead of cron: an interval (seconds, or 30s, 5m, 1h, 1d); >= 1s."
    )
    timezone: str = Field("UTC", max_length=64, description="The IANA zone of the cron times.")
    type: str = Field(max_length=200, description="A registered, enabled task type.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="Each fire's payload: a JSON object."
    )
    queue: str | None = Field(None, description="One of TASKQ_QUEUES; default: the type's.")
    catch_up: Literal["skip", "once", "all"] = Field(
        "once", description="Fires missed while no sweeper ran: skip, once for all, or each."
    )
    catch_up_limit: int = Field(100, ge=1, le=1000, description="With all: at most this many.")
    overlap: Literal["allow", "skip"] = Field(
        "allow", description="skip: no fire while the previous fire's task is not finished."
    )

    _integral_limit = field_validator("catch_up_limit", mode="before")(integral)


def schedule_spec(name: str, data: Any, *, source: str = "api") -> tuple[ScheduleSpec, Timetable]:
    """Check a schedule's definition; returns it with its timetable.

    Raises:
        InvalidRequest: naming every field at fault.
    """
    errors: list[FieldError] = []
    if not isinstance(name, str) or not SCHEDULE_NAME.match(name):
        errors.append(
            FieldError("name", "1-200 of A-Z a-z 0-9 _ . : -, starting with a letter or digit")
        )
    try:
        body = ScheduleBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(errors + field_errors(exc, "")) from None
    every: float | None = None
    if (body.cron is None) == (body.every is None):
        errors.append(FieldError("cron", "give either cron or every"))
    if body.every is not None:
        try:
            every = parse_duration(body.every)
        except ValueError:
            errors.append(FieldError("every", "seconds, or a duration such as 30s, 5m, 1h, 1d"))
        else:
            if not MIN_EVERY <= every <= MAX_EVERY:
                errors.append(FieldError("every", "from 1s to 366d"))
    table: Timetable | None = None
    if not errors:
        try:
            table = timetable(
                cron_expression=body.cron, timezone=body.timezone, every_seconds=every
            )
        except CronProblem as exc:
            field = "timezone" if exc.field == "timezone" else "cron"
            errors.append(FieldError(field, str(exc)))
    if errors or table is None:
        raise InvalidRequest(errors)
    spec = ScheduleSpec(
        name=name,
        cron=body.cron.strip() if body.cron is not None else None,
        timezone=body.timezone,
        every_seconds=every,
        type=body.type,
        payload=orjson.dumps(body.payload).decode(),
        queue=body.queue,
        catch_up=CatchUp(body.catch_up),
        catch_up_limit=body.catch_up_limit,
        overlap=Overlap(body.overlap),
        source=source,
    )
    return spec, table


def schedule_body(schedule: ScheduleRecord, table: Timetable | None = None) -> dict[str, Any]:
    """A schedule as the API shows it, with its next fires (``upcoming``)."""
    upcoming: list[datetime] = []
    if table is not None and not schedule.paused:
        upcoming = [schedule.next_fire_at]
        upcoming += itertools.islice(table.fires(schedule.next_fire_at), UPCOMING - 1)
    return {
        "name": schedule.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "every": schedule.every_seconds,
        "type": schedule.type,
        "payload": orjson.loads(schedule.payload),
        "queue": schedule.queue,
        "catch_up": schedule.catch_up,
        "catch_up_limit": schedule.catch_up_limit,
        "overlap": schedule.overlap,
        "paused": schedule.paused,
        "source": schedule.source,
        "next_fire_at": None if schedule.paused else schedule.next_fire_at,
        "upcoming": upcoming,
        "last_fire_at": schedule.last_fire_at,
        "last_task_id": schedule.last_task_id,
        "last_task_status": schedule.last_task_status,
        "fires": schedule.fires,
        "skipped": schedule.skipped,
        "last_error": schedule.last_error,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
    }


async def set_paused(store: Store, name: str, *, paused: bool) -> ScheduleRecord | None:
    """Pause or resume schedule ``name`` (None: there is none). A resume takes the first
    fire after now: the fires of the pause are not caught up.

    Raises:
        CronProblem: the schedule cannot compute its fires any more (its zone is gone).
    """
    schedule = await store.schedule(name)
    if schedule is None:
        return None
    next_fire_at: datetime | None = None
    if schedule.paused and not paused:
        next_fire_at = first_fire(timetable_of(schedule), await store.database_now())
    return await store.pause_schedule(name, paused=paused, next_fire_at=next_fire_at)


async def fire_now(
    store: Store, publisher: Publisher, name: str
) -> tuple[ScheduleRecord, uuid.UUID | None] | None:
    """Enqueue schedule ``name``'s task now, paused or not, moving none of its fires.

    Returns None if there is no such schedule; else the schedule and the task's id,
    None when its type is unknown or disabled (``last_error`` says so).

    Raises:
        TaskqError: the active sweeper kept moving the schedule on meanwhile.
    """
    scheduler = Scheduler(store, publisher)
    for _ in range(3):  # the sweeper may move the schedule on between the read and the fire
        schedule = await store.schedule(name)
        if schedule is None:
            return None
        task_id = await scheduler.trigger(schedule)
        if task_id is not None:
            return schedule, task_id
        again = await store.schedule(name)
        if again is None:
            return None
        if again.next_fire_at == schedule.next_fire_at:  # nothing moved: the type is unusable
            return again, None
    raise TaskqError(f"schedule {name!r} kept moving on while being triggered; try again")


def first_fire(table: Timetable, now: datetime) -> datetime:
    """The next fire of a new (or resumed) schedule: the first after ``now``."""
    return next_fire(table, now)
