"""The plan of a due schedule: which fires to enqueue, which to skip, the next fire."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskq.errors import CronProblem
from taskq.fleet import scheduler
from taskq.fleet.scheduler import Every, plan, timetable
from taskq.model import CatchUp, Overlap, ScheduleRecord, TaskStatus

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def schedule(**fields: Any) -> ScheduleRecord:
    values: dict[str, Any] = {
        "name": "report",
        "cron": "* * * * *",
        "timezone": "UTC",
        "every_seconds": None,
        "type": "report.v1",
        "payload": "{}",
        "queue": None,
        "catch_up": CatchUp.ONCE,
        "catch_up_limit": 100,
        "overlap": Overlap.ALLOW,
        "paused": False,
        "source": "api",
        "next_fire_at": T0,
        "last_fire_at": None,
        "last_task_id": None,
        "last_task_status": None,
        "fires": 0,
        "skipped": 0,
        "last_error": None,
        "created_at": T0,
        "updated_at": T0,
        "created": False,
    }
    values.update(fields)
    return ScheduleRecord(**values)


def plan_of(record: ScheduleRecord, now: datetime) -> scheduler.Plan:
    table = timetable(
        cron_expression=record.cron, timezone=record.timezone, every_seconds=record.every_seconds
    )
    return plan(record, table, now)


def test_on_time_fires_once_and_moves_to_the_next() -> None:
    planned = plan_of(schedule(), T0 + timedelta(seconds=0.3))
    assert planned.fires == [T0]
    assert planned.skipped == 0
    assert planned.next_fire_at == T0 + MINUTE


def test_exactly_at_a_fire_time_the_next_one_is_after_it() -> None:
    planned = plan_of(schedule(), T0 + MINUTE)  # T0 + 1 min is due too
    assert planned.fires == [T0 + MINUTE]  # catch_up=once: the latest
    assert planned.skipped == 1
    assert planned.next_fire_at == T0 + 2 * MINUTE


@pytest.mark.parametrize(
    ("catch_up", "limit", "fires", "skipped"),
    [
        (CatchUp.SKIP, 100, [], 10),  # the latest is 2 min late: past the grace too
        (CatchUp.ONCE, 100, [T0 + 45 * MINUTE], 9),
        (CatchUp.ALL, 100, [T0 + k * 5 * MINUTE for k in range(10)], 0),
        (CatchUp.ALL, 3, [T0 + k * 5 * MINUTE for k in (7, 8, 9)], 7),
    ],
)
def test_missed_fires_follow_the_catch_up_policy(
    catch_up: CatchUp, limit: int, fires: list[datetime], skipped: int
) -> None:
    now = T0 + 47 * MINUTE  # 10:47: the fires 10:00, 10:05 ... 10:45 are due
    record = schedule(cron="*/5 * * * *", catch_up=catch_up, catch_up_limit=limit)
    planned = plan_of(record, now)
    assert planned.fires == fires
    assert planned.skipped == skipped
    assert planned.next_fire_at == T0 + 50 * MINUTE


def test_skip_still_fires_the_latest_within_the_grace() -> None:
    now = T0 + 5 * MINUTE + timedelta(seconds=scheduler.GRACE - 1)
    planned = plan_of(schedule(catch_up=CatchUp.SKIP), now)
    assert planned.fires == [T0 + 5 * MINUTE]
    assert planned.skipped == 5


@pytest.mark.parametrize("status", [TaskStatus.ENQUEUED, TaskStatus.RUNNING])
def test_overlap_skip_while_the_previous_task_is_not_finished(status: TaskStatus) -> None:
    record = schedule(overlap=Overlap.SKIP, last_task_status=status)
    planned = plan_of(record, T0 + timedelta(seconds=1))
    assert planned.fires == []
    assert planned.skipped == 1
    assert planned.next_fire_at == T0 + MINUTE


@pytest.mark.parametrize(
    "status", [None, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED]
)
def test_overlap_skip_fires_once_the_previous_task_finished(status: TaskStatus | None) -> None:
    record = schedule(overlap=Overlap.SKIP, catch_up=CatchUp.ALL, last_task_status=status)
    planned = plan_of(record, T0 + 2 * MINUTE + timedelta(seconds=1))
    assert planned.fires == [T0 + 2 * MINUTE]  # never several at once: they would overlap
    assert planned.skipped == 2


def test_overlap_allow_ignores_the_previous_task() -> None:
    record = schedule(last_task_status=TaskStatus.RUNNING)
    assert plan_of(record, T0).fires == [T0]


def test_a_very_long_outage_is_bounded() -> None:
    record = schedule(every_seconds=1.0, cron=None, catch_up=CatchUp.ALL, catch_up_limit=5)
    now = T0 + timedelta(days=2)
    planned = plan_of(record, now)
    assert len(planned.fires) == 5
    assert planned.fires[-1] < now
    assert planned.next_fire_at == now + timedelta(seconds=1)
    assert planned.skipped >= scheduler.MAX_DUE - 5


def test_every_fires_at_multiples_since_the_epoch() -> None:
    after = datetime(2026, 12, 7, 10, 0, 7, tzinfo=UTC)
    fires = list(itertools.islice(Every(15).fires(after), 3))
    assert [f.second for f in fires] == [15, 30, 45]
    assert Every(15).fires(datetime(2026, 12, 7, 10, 0, 15, tzinfo=UTC)).__next__().second == 30


def test_cron_in_a_zone() -> None:
    record = schedule(cron="0 9 * * *", timezone="Europe/Paris", next_fire_at=T0)
    # 10:00 UTC was due; the next 09:00 in Paris is 08:00 UTC the next day.
    assert plan_of(record, T0).next_fire_at == datetime(2026, 12, 8, 8, 0, tzinfo=UTC)


def test_idempotency_keys_name_the_schedule_and_the_fire_in_utc() -> None:
    fire = datetime(2026, 12, 7, 11, 0, tzinfo=UTC).astimezone(timedelta_zone(1))
    assert (
        scheduler.idempotency_key("report", fire) == "schedule:report:2026-12-07T11:00:00.000000Z"
    )


def timedelta_zone(hours: int) -> Any:
    from datetime import timezone

    return timezone(timedelta(hours=hours))


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"cron_expression": "61 * * * *"}, "minute"),
        ({"cron_expression": "* * * * *", "timezone": "Nowhere/City"}, "unknown time zone"),
        ({"cron_expression": None}, "needs a cron expression or an interval"),
    ],
)
def test_timetable_refusals(fields: dict[str, Any], says: str) -> None:
    arguments: dict[str, Any] = {"cron_expression": None, "timezone": "UTC", "every_seconds": None}
    arguments.update(fields)
    with pytest.raises(CronProblem, match=says):
        timetable(**arguments)
