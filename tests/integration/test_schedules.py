"""Schedules through the real Postgres and RabbitMQ: the store's statements and the
sweeper's duty that fires them, once per fire whatever races it."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskq import Context, Registry, Schedule
from taskq.errors import HandlerError
from taskq.fleet.scheduler import Scheduler, idempotency_key
from taskq.metrics import WorkerMetrics
from taskq.model import CatchUp, Overlap, ScheduleFire, ScheduleRecord, ScheduleSpec
from taskq.settings import Settings
from tests.support.worker_fixtures import Harness, harness, poll, running_worker

pytestmark = pytest.mark.integration


def spec(**fields: Any) -> ScheduleSpec:
    values: dict[str, Any] = {
        "name": "nightly",
        "cron": "* * * * *",
        "timezone": "UTC",
        "every_seconds": None,
        "type": "demo.echo",
        "payload": json.dumps({"report": "daily"}),
        "queue": None,
        "catch_up": CatchUp.ONCE,
        "catch_up_limit": 100,
        "overlap": Overlap.ALLOW,
        "source": "api",
    }
    values.update(fields)
    return ScheduleSpec(**values)


def minute_floor(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


async def due_schedule(h: Harness, minutes_ago: int = 0, **fields: Any) -> ScheduleRecord:
    """A per-minute schedule whose next fire was ``minutes_ago`` minutes before this minute."""
    first = minute_floor(datetime.now(UTC)) - timedelta(minutes=minutes_ago)
    return await h.store.put_schedule(spec(**fields), first, max_schedules=100)


async def scheduled_tasks(h: Harness, name: str) -> list[tuple[str, str]]:
    rows = await h.store.pool.fetch(
        "SELECT idempotency_key, payload::text FROM tasks"
        " WHERE idempotency_key LIKE $1 ORDER BY idempotency_key",
        f"schedule:{name}:%",
    )
    return [(row["idempotency_key"], row["payload"]) for row in rows]


async def test_put_keeps_the_next_fire_unless_the_timing_changes(settings: Settings) -> None:
    async with harness(settings) as h:
        first = datetime(2030, 1, 1, tzinfo=UTC)
        created = await h.store.put_schedule(spec(), first, max_schedules=100)
        assert created.created
        assert created.next_fire_at == first
        later = datetime(2030, 6, 1, tzinfo=UTC)
        same_timing = await h.store.put_schedule(
            spec(payload='{"report": "weekly"}'), later, max_schedules=100
        )
        assert not same_timing.created
        assert same_timing.next_fire_at == first  # a worker's restart moves nothing
        assert json.loads(same_timing.payload) == {"report": "weekly"}
        moved = await h.store.put_schedule(spec(cron="0 * * * *"), later, max_schedules=100)
        assert moved.next_fire_at == later
        assert [s.name for s in await h.store.schedules("", 10)] == ["nightly"]
        assert await h.store.count_schedules() == 1
        assert await h.store.delete_schedule("nightly")
        assert not await h.store.delete_schedule("nightly")
        assert await h.store.schedule("nightly") is None


async def test_a_due_schedule_fires_once_and_its_task_is_published(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        record = await due_schedule(h)
        metrics = WorkerMetrics()
        scheduler = Scheduler(h.store, h.publisher, metrics=metrics)
        assert await scheduler.fire_due() == 1
        assert await scheduler.fire_due() == 0  # the next fire is a minute away

        [(key, payload)] = await scheduled_tasks(h, "nightly")
        assert key == idempotency_key("nightly", record.next_fire_at)
        assert json.loads(payload) == {"report": "daily"}
        [envelope] = await h.take(h.names.queue("default"), 1, 5)
        after = await h.store.schedule("nightly")
        assert after is not None
        assert envelope.message_id == str(after.last_task_id)
        assert after.next_fire_at == record.next_fire_at + timedelta(minutes=1)
        assert (after.fires, after.skipped, after.last_fire_at) == (1, 0, record.next_fire_at)
        task = await h.task(after.last_task_id)  # type: ignore[arg-type]
        assert task.published_at is not None
        assert (
            metrics.registry.get_sample_value("taskq_schedule_fires_total", {"schedule": "nightly"})
            == 1
        )
        assert metrics.registry.get_sample_value("taskq_schedule_lateness_seconds_count") == 1


async def test_racing_sweepers_fire_each_fire_once(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        await due_schedule(h, minutes_ago=4, catch_up=CatchUp.ALL)
        schedulers = [Scheduler(h.store, h.publisher) for _ in range(4)]
        fired = await asyncio.gather(*(s.fire_due() for s in schedulers))
        assert sum(fired) == 5
        assert len(await scheduled_tasks(h, "nightly")) == 5


async def test_a_stale_planner_changes_nothing(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        stale = await due_schedule(h, minutes_ago=1)
        assert await Scheduler(h.store, h.publisher).fire_due() == 1
        # A leader that froze with the old row wakes and fires what it planned.
        fire = ScheduleFire(
            name="nightly",
            expected_next_fire_at=stale.next_fire_at,
            manual=False,
            ids=[uuid.uuid4()],
            idempotency_keys=[idempotency_key("nightly", stale.next_fire_at)],
            next_fire_at=stale.next_fire_at + timedelta(minutes=1),
            last_fire_at=stale.next_fire_at,
            skipped=0,
            fingerprint="schedule:nightly",
        )
        assert await h.store.fire_schedule(fire) == []
        after = await h.store.schedule("nightly")
        assert after is not None
        assert after.fires == 1
        assert after.next_fire_at > stale.next_fire_at + timedelta(minutes=1)


@pytest.mark.parametrize(
    ("catch_up", "tasks", "skipped"),
    [(CatchUp.SKIP, 1, 5), (CatchUp.ONCE, 1, 5), (CatchUp.ALL, 6, 0)],
)
async def test_missed_fires_follow_the_catch_up_policy(
    settings: Settings, catch_up: CatchUp, tasks: int, skipped: int
) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        await due_schedule(h, minutes_ago=5, catch_up=catch_up)
        await Scheduler(h.store, h.publisher).fire_due()
        found = await scheduled_tasks(h, "nightly")
        assert len(found) == tasks
        # The fire of this minute is within the grace: even catch_up=skip enqueues it.
        this_minute = minute_floor(datetime.now(UTC))
        assert found[-1][0] in {
            idempotency_key("nightly", this_minute),
            idempotency_key("nightly", this_minute - timedelta(minutes=1)),  # the clock moved
        }
        after = await h.store.schedule("nightly")
        assert after is not None
        assert after.skipped == skipped


async def test_overlap_skip_waits_for_the_previous_task(settings: Settings) -> None:
    # A next fire set a second ago must not straddle a minute: a per-minute schedule
    # would then have two fires due (that second, and the minute), both skipped.
    second = datetime.now(UTC).second
    if second >= 50:
        await asyncio.sleep(62 - second)
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        await due_schedule(h, overlap=Overlap.SKIP)
        scheduler = Scheduler(h.store, h.publisher)
        assert await scheduler.fire_due() == 1
        # Its task is still ENQUEUED when the next fire comes.
        await h.store.pool.execute(
            "UPDATE schedules SET next_fire_at = now() - interval '1 second'"
        )
        assert await scheduler.fire_due() == 0
        after = await h.store.schedule("nightly")
        assert after is not None
        assert (after.fires, after.skipped) == (1, 1)
        await h.store.pool.execute(
            "UPDATE tasks SET status = 'SUCCEEDED', finished_at = now() WHERE id = $1",
            after.last_task_id,
        )
        await h.store.pool.execute(
            "UPDATE schedules SET next_fire_at = now() - interval '1 second'"
        )
        assert await scheduler.fire_due() == 1


async def test_an_unknown_type_skips_the_fire_and_says_why(settings: Settings) -> None:
    async with harness(settings) as h:
        await due_schedule(h, type="no.such.type")
        assert await Scheduler(h.store, h.publisher).fire_due() == 0
        after = await h.store.schedule("nightly")
        assert after is not None
        assert after.last_error == "task type no.such.type is unknown or disabled: fires skipped"
        assert (after.fires, after.skipped) == (0, 1)
        assert after.next_fire_at > datetime.now(UTC)  # it moved on: no busy loop


async def test_paused_schedules_wait_and_trigger_fires_them_anyway(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        record = await due_schedule(h, minutes_ago=3)
        paused = await h.store.pause_schedule("nightly", paused=True)
        assert paused is not None and paused.paused
        scheduler = Scheduler(h.store, h.publisher)
        assert await scheduler.fire_due() == 0

        task_id = await scheduler.trigger(paused)
        assert task_id is not None
        [envelope] = await h.take(h.names.queue("default"), 1, 5)
        assert envelope.message_id == str(task_id)
        after = await h.store.schedule("nightly")
        assert after is not None
        assert after.next_fire_at == record.next_fire_at  # a trigger moves no fire
        assert (after.fires, after.last_task_id) == (1, task_id)

        resumed_at = datetime.now(UTC) + timedelta(minutes=1)
        resumed = await h.store.pause_schedule("nightly", paused=False, next_fire_at=resumed_at)
        assert resumed is not None and not resumed.paused
        assert resumed.next_fire_at == resumed_at  # the fires of the pause are not caught up
        assert await scheduler.fire_due() == 0
        assert await h.store.pause_schedule("missing", paused=True) is None


async def test_a_handlers_schedule_is_declared_fired_and_kept_in_step(settings: Settings) -> None:
    ran: list[dict[str, Any]] = []
    registry = Registry()

    @registry.task("pulse.v1", schedule=Schedule(every="1s", payload={"n": 1}, catch_up="skip"))
    async def pulse(payload: dict[str, Any], ctx: Context) -> None:
        ran.append(payload)

    @registry.task("nightly.v1", schedule="30 2 * * *", tz="Europe/Paris")
    async def nightly(payload: dict[str, Any], ctx: Context) -> None:
        pass

    async with harness(settings) as h, running_worker(settings, registry):
        await poll(lambda: len(ran) >= 2, "the declared schedule did not fire twice")
        assert ran[0] == {"n": 1}
        declared = {s.name: s for s in await h.store.schedules("", 10)}
        assert set(declared) == {"pulse.v1", "nightly.v1"}
        assert declared["nightly.v1"].source == "code"
        assert (declared["nightly.v1"].cron, declared["nightly.v1"].timezone) == (
            "30 2 * * *",
            "Europe/Paris",
        )
        assert declared["pulse.v1"].every_seconds == 1.0

    # A restart of a worker whose code no longer declares pulse.v1's schedule.
    before = declared["nightly.v1"].next_fire_at
    smaller = Registry()
    smaller.task("pulse.v1")(pulse.function)
    smaller.task("nightly.v1", schedule="30 2 * * *", tz="Europe/Paris")(nightly.function)
    async with harness(settings) as h, running_worker(settings, smaller):
        names = [s.name for s in await h.store.schedules("", 10)]
        assert names == ["nightly.v1"]
        kept = await h.store.schedule("nightly.v1")
        assert kept is not None and kept.next_fire_at == before


def test_invalid_declared_schedules_are_refused_at_registration() -> None:
    registry = Registry()
    for bad, says in (
        ("61 * * * *", "minute"),
        (Schedule(cron="* * * * *", every=5), "either cron or every"),
        (Schedule(), "either cron or every"),
        (Schedule(cron="* * * * *", timezone="Nowhere/Town"), "unknown time zone"),
        (5, "a cron expression or a taskq.Schedule"),
    ):
        with pytest.raises(HandlerError, match=says):
            registry.task("bad.v1", schedule=bad)(lambda payload, ctx: None)  # type: ignore[arg-type]
    assert "bad.v1" not in registry
