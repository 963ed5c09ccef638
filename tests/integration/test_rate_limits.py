"""Rate limits enforced by the claim (taskq.ratelimits): starts spaced by the limit
across workers, per-key buckets, a reservation claimed without a second slot, and
no attempt counted for the wait."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from taskq import ratelimits
from taskq.handlers import Context, Registry
from taskq.model import ClaimDecision, ClaimedTask, TaskRecord, Unclaimed
from taskq.ratelimits import RateLimit
from taskq.settings import Settings
from taskq.store import NewTask
from tests.support.worker_fixtures import Harness, harness, metric, running_worker, until

pytestmark = pytest.mark.integration


def limited_registry(rate_limit: object) -> Registry:
    registry = Registry()

    @registry.task("rl.tick", rate_limit=rate_limit)  # type: ignore[arg-type]
    async def tick(payload: dict[str, object], ctx: Context) -> None:
        return None

    return registry


async def all_done(h: Harness, ids: list[uuid.UUID], timeout: float) -> list[TaskRecord]:
    async def done() -> bool:
        rows = [await h.task(i) for i in ids]
        return all(r.status == "SUCCEEDED" for r in rows)

    await until(done, f"{len(ids)} limited tasks did not all succeed", timeout)
    return [await h.task(i) for i in ids]


def decision(row: ClaimedTask | Unclaimed) -> ClaimDecision:
    return ClaimDecision.CLAIMED if isinstance(row, ClaimedTask) else row.decision


def most_in_a_window(starts: list[datetime], window: float) -> int:
    """The most starts in any half-open window [t, t + window) that begins at a start."""
    starts = sorted(starts)
    most, j = 0, 0
    for i, start in enumerate(starts):
        while j < len(starts) and starts[j] < start + timedelta(seconds=window):
            j += 1
        most = max(most, j - i)
    return most


async def test_two_workers_share_a_limit_of_20_per_second(settings: Settings) -> None:
    registry = limited_registry({"limit": 20, "per": "1s"})
    count = 100  # five seconds' worth, enqueued at once
    async with (
        harness(settings) as h,
        running_worker(settings, registry, concurrency=20) as one,
        running_worker(settings, registry, concurrency=20) as two,
    ):
        ids = [await h.enqueue("rl.tick") for _ in range(count)]
        rows = await all_done(h, ids, timeout=90)
        # The wait counted no attempt.
        assert {r.attempts for r in rows} == {1}
        starts = sorted(r.started_at for r in rows if r.started_at is not None)
        # Starts are 50 ms apart at the least (slots are; a start is never before its
        # slot): five seconds for 100 of them, within a little of the first slot.
        assert (starts[-1] - starts[0]).total_seconds() >= (count - 1) * 0.05 - 0.05
        # Any second holds 20 starts, plus the one at its end; one more is allowed
        # for a start that a loaded machine made late next to one on time.
        assert most_in_a_window(starts, 1.0) <= 22
        # ... and the limit does not slow them much beyond its pace either.
        assert (starts[-1] - starts[0]).total_seconds() < 20
        limited = sum(
            metric(w, "taskq_deliveries_total", queue="default", decision="limited")
            for w in (one, two)
        )
        early = sum(
            metric(w, "taskq_deliveries_total", queue="default", decision="early")
            for w in (one, two)
        )
        # Most waited for a slot; none cycled through the broker: each came back at
        # most twice (once from the delay levels, once held until its slot).
        assert limited >= count / 2
        assert early <= 2 * limited
        by_type = sum(metric(w, "taskq_rate_limited_total", type="rl.tick") for w in (one, two))
        assert by_type == limited


async def test_a_keyed_limiter_gives_each_key_its_own_pace(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.store.put_limiter("per-customer", RateLimit(2, 1.0, key="customer"))
        registry = limited_registry("per-customer")
        async with running_worker(settings, registry, concurrency=10):
            ids = {
                customer: [await h.enqueue("rl.tick", {"customer": customer}) for _ in range(5)]
                for customer in ("a", "b")
            }
            starts = {}
            for customer, tasks in ids.items():
                rows = await all_done(h, tasks, timeout=60)
                starts[customer] = sorted(r.started_at for r in rows if r.started_at)
        for customer_starts in starts.values():
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(customer_starts)]
            # 2 per second: half a second apart, each key on its own.
            assert min(gaps) >= 0.45, gaps
        # The keys ran side by side, not one after the other (4 x 0.5 s each).
        assert abs((starts["a"][0] - starts["b"][0]).total_seconds()) < 1.5
        (limiter,) = await h.store.limiters("per-customer")
        assert limiter.types == ["rl.tick"] and limiter.key == "customer"


async def limited_tasks(h: Harness, name: str, limit: RateLimit, count: int) -> list[uuid.UUID]:
    """``count`` tasks of a new type ``name`` limited by ``limit``, enqueued (not published)."""
    await h.put_type(name)
    await h.store.set_type_rate_limits([(name, limit)], "api")
    ids = []
    for _ in range(count):
        task_id = uuid.uuid4()
        await h.store.enqueue([NewTask(task_id, name, "{}")])
        ids.append(task_id)
    return ids


async def bucket(settings: Settings, limiter: str) -> asyncpg.Record:
    """The ``tat`` and ``promised`` of a limiter's bucket (without key)."""
    connection = await asyncpg.connect(settings.database_url)
    try:
        row = await connection.fetchrow(
            f"SELECT tat, promised FROM {settings.db_schema}.rate_limit_buckets"
            " WHERE limiter = $1 AND key = ''",
            limiter,
        )
    finally:
        await connection.close()
    assert row is not None
    return row


async def test_a_reservation_is_claimed_before_its_slot_to_start_at_it(
    settings: Settings,
) -> None:
    limit = RateLimit(1, 1.2)  # the second slot is within the hold window
    async with harness(settings) as h:
        ids = await limited_tasks(h, "rl.slow", limit, 2)
        rows = {r.id: r for r in await h.store.claim(ids, "w1", 30.0)}
        assert sorted(decision(r) for r in rows.values()) == ["claimed", "limited"]
        (waiting,) = [i for i in ids if decision(rows[i]) == ClaimDecision.LIMITED]
        record = await h.task(waiting)
        assert record.status == "ENQUEUED" and record.attempts == 0
        assert record.limited_by == ratelimits.own_limiter("rl.slow")
        # Its slot is reserved; it is due (claimed) a little before it.
        assert record.limited_until is not None
        slot = record.limited_until
        ahead = timedelta(seconds=ratelimits.CLAIM_AHEAD_SECONDS)
        assert record.run_at == slot - ahead
        tat = (await bucket(settings, ratelimits.own_limiter("rl.slow")))["tat"]
        assert tat == slot + timedelta(seconds=1.2)
        limited = rows[waiting]
        assert isinstance(limited, Unclaimed)
        await asyncio.sleep(max(0.0, limited.delay) + 0.02)
        (claimed,) = await h.store.claim([waiting], "w1", 30.0)
        # Claimed without taking a second slot; it starts at its slot, which the
        # worker waits for.
        assert isinstance(claimed, ClaimedTask)
        assert 0 < claimed.start_at - time.monotonic() <= ratelimits.CLAIM_AHEAD_SECONDS
        record = await h.task(waiting)
        assert record.limited_until is None and record.attempts == 1
        assert record.started_at == slot
        assert (await bucket(settings, ratelimits.own_limiter("rl.slow")))["tat"] == tat


async def test_a_late_reservation_takes_the_next_slot(settings: Settings) -> None:
    limit = RateLimit(1, 1.2)
    async with harness(settings) as h:
        ids = await limited_tasks(h, "rl.late", limit, 2)
        rows = {r.id: r for r in await h.store.claim(ids, "w1", 30.0)}
        (waiting,) = [i for i in ids if decision(rows[i]) == ClaimDecision.LIMITED]
        slot = (await h.task(waiting)).limited_until
        assert slot is not None
        # A worker that stalled: it claims the task over one spacing past its slot.
        delay = (slot - datetime.now(UTC)).total_seconds() + 1.2 + 0.1
        await asyncio.sleep(max(0.0, delay))
        (again,) = await h.store.claim([waiting], "w1", 30.0)
        record = await h.task(waiting)
        tat = (await bucket(settings, ratelimits.own_limiter("rl.late")))["tat"]
        # The missed slot is not claimed late: the task took the next one (due now,
        # the bucket idle since), a spacing before the bucket's new tat.
        assert isinstance(again, ClaimedTask)
        assert record.started_at is not None and record.started_at > slot + timedelta(seconds=1.2)
        assert tat == record.started_at + timedelta(seconds=1.2)


async def test_a_backlog_takes_slots_only_within_the_hold_window(settings: Settings) -> None:
    """The startup dip: workers read a backlog much faster than its rate; a slot given
    to a delivery they send back would come back behind the backlog, past it."""
    limit = RateLimit(10, 1.0)  # a slot each 100 ms
    name = ratelimits.own_limiter("rl.backlog")
    async with harness(settings) as h:
        ids = await limited_tasks(h, "rl.backlog", limit, 40)
        rows = await h.store.claim(ids, "w1", 30.0)
        records = {r.id: await h.task(r.id) for r in rows}
        claimed = [r for r in rows if isinstance(r, ClaimedTask)]
        reserved = [i for i, r in records.items() if r.limited_until is not None]
        waits = sorted(
            (r.run_at for r in records.values() if r.status == "ENQUEUED" and not r.limited_until),
        )
        # Slots within the hold window (1.25 s: 13 of them) for 13 tasks: those due
        # within the claim's lead claimed now (to start at their slots), the others
        # reserved; the 27 others wait without a slot, one spacing apart after the
        # last slot taken, none counting an attempt.
        hold, ahead = ratelimits.HOLD_SECONDS, ratelimits.CLAIM_AHEAD_SECONDS
        taken = int(hold / limit.spacing) + 1
        assert len(claimed) + len(reserved) == taken
        assert len(claimed) == int(ahead / limit.spacing + 1e-9) + 1
        assert len(waits) == 40 - taken
        assert all(r.attempts == 0 for r in records.values() if r.status == "ENQUEUED")
        assert all(r.limited_by == name for r in records.values() if r.status == "ENQUEUED")
        state = await bucket(settings, name)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(waits)]
        assert gaps == pytest.approx([0.1] * (len(waits) - 1), abs=1e-6)
        assert waits[0] == state["tat"] and state["promised"] == waits[-1] + timedelta(seconds=0.1)

        # A task read later from the backlog takes the next slot once it is within the
        # hold window: before those that wait, whose slots are not taken yet.
        late_id = uuid.uuid4()
        await h.store.enqueue([NewTask(late_id, "rl.backlog", "{}")])
        await asyncio.sleep(
            max(0.0, (state["tat"] - datetime.now(UTC)).total_seconds() - hold + 0.05)
        )
        (late,) = await h.store.claim([late_id], "w1", 30.0)
        late_record = await h.task(late_id)
        late_slot = late_record.limited_until or late_record.started_at
        assert decision(late) in (ClaimDecision.CLAIMED, ClaimDecision.LIMITED)
        assert late_slot is not None and late_slot >= state["tat"]
        assert late_slot < waits[0] + timedelta(seconds=hold)

        # Back from its wait, a task takes the next slot, however far: it never waits
        # without a slot twice.
        first = next(i for i, r in records.items() if r.run_at == waits[0])
        await asyncio.sleep(max(0.0, (waits[0] - datetime.now(UTC)).total_seconds() + 0.01))
        (back,) = await h.store.claim([first], "w1", 30.0)
        back_record = await h.task(first)
        assert decision(back) in (ClaimDecision.CLAIMED, ClaimDecision.LIMITED)
        back_slot = back_record.limited_until or back_record.started_at
        # Its slot is after the task read later (a spacing, or more if claimed later).
        assert back_slot is not None and back_slot >= late_slot + timedelta(seconds=0.1)


async def test_a_task_back_from_its_wait_goes_before_one_late_from_it(
    settings: Settings,
) -> None:
    """A task back from its wait later than the hold window came back behind a backlog:
    it asks as a new one does, after those back on time."""
    limit = RateLimit(10, 1.0)
    async with harness(settings) as h:
        ids = await limited_tasks(h, "rl.behind", limit, 20)
        await h.store.claim(ids, "w1", 30.0)
        records = [await h.task(i) for i in ids]
        waiting = sorted(
            (r for r in records if r.status == "ENQUEUED" and r.limited_until is None),
            key=lambda r: r.run_at,
        )
        first, last = waiting[0], waiting[-1]
        assert (last.run_at - first.run_at).total_seconds() < ratelimits.HOLD_SECONDS
        # The first wait ended over the hold window ago, the last one less long ago.
        await asyncio.sleep(
            max(0.0, (first.run_at - datetime.now(UTC)).total_seconds())
            + ratelimits.HOLD_SECONDS
            + 0.05
        )
        rows = await h.store.claim([first.id, last.id], "w1", 30.0)
        assert all(isinstance(r, ClaimedTask) for r in rows)  # the bucket is idle again
        late, back = await h.task(first.id), await h.task(last.id)
        assert late.started_at is not None and back.started_at is not None
        assert late.started_at == back.started_at + timedelta(seconds=0.1)


async def test_two_claims_creating_one_bucket_decide_the_second_early(
    settings: Settings,
) -> None:
    limit = RateLimit(10, 1.0)
    async with harness(settings) as h:
        ids = await limited_tasks(h, "rl.race", limit, 2)
        async with h.store.claim_open([ids[0]], "w1", 30.0) as first:
            assert [decision(r) for r in first.rows] == [ClaimDecision.CLAIMED]
            second = asyncio.create_task(h.store.claim([ids[1]], "w2", 30.0))
            # The second claim waits for the first's new bucket (a lock, not a timer).
            await until_lock_wait(settings)
        (row,) = await second
        # It did not overwrite the bucket: its task is claimed again at once.
        assert isinstance(row, Unclaimed) and row.decision == ClaimDecision.EARLY
        assert row.delay == 0.0
        (again,) = await h.store.claim([ids[1]], "w2", 30.0)
        assert decision(again) in (ClaimDecision.CLAIMED, ClaimDecision.LIMITED)
        tat = (await bucket(settings, ratelimits.own_limiter("rl.race")))["tat"]
        first_start = (await h.task(ids[0])).started_at
        assert first_start is not None and tat >= first_start + timedelta(seconds=0.2 - 1e-6)


async def until_lock_wait(settings: Settings) -> None:
    """Wait until a backend of the test's database waits for a lock."""
    connection = await asyncpg.connect(settings.database_url)
    try:

        async def waiting() -> bool:
            return bool(
                await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )

        await until(waiting, "the second claim never waited for the first's lock", 10)
    finally:
        await connection.close()


async def test_the_claim_takes_the_slots_gcra_gives(settings: Settings) -> None:
    """The statement's arithmetic against taskq.ratelimits.slots, with a burst."""
    limit = RateLimit(10, 1.0, burst=3)
    async with harness(settings) as h:
        ids = await limited_tasks(h, "rl.burst", limit, 6)
        rows = await h.store.claim(ids, "w1", 30.0)
        # Three start at once (the burst), then one each 100 ms: all within the
        # claim's lead, so all claimed now, each to start at its slot.
        assert [decision(r) for r in rows].count(ClaimDecision.CLAIMED) == 6
        records = [await h.task(r.id) for r in rows]
        starts = sorted(r.started_at for r in records if r.started_at is not None)
        assert len(starts) == 6
        expected, tat = ratelimits.slots(None, starts[0], 6, limit)
        assert [(s - starts[0]).total_seconds() for s in starts] == pytest.approx(
            [(e - expected[0]).total_seconds() for e in expected], abs=1e-6
        )
        now = time.monotonic()
        waits = sorted(r.start_at and r.start_at - now for r in rows if isinstance(r, ClaimedTask))
        assert waits[:3] == [0.0, 0.0, 0.0] and 0 < waits[5] <= 0.3
        state = await bucket(settings, ratelimits.own_limiter("rl.burst"))
        assert state["tat"] == tat


async def test_types_without_a_limit_are_claimed_as_before(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("rl.free")
        ids = []
        for _ in range(50):
            task_id = uuid.uuid4()
            await h.store.enqueue([NewTask(task_id, "rl.free", "{}")])
            ids.append(task_id)
        rows = await h.store.claim(ids, "w1", 30.0)
        assert all(isinstance(r, ClaimedTask) for r in rows)
        assert await h.store.limiters() == []


async def test_idle_buckets_are_pruned(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.store.put_limiter("per-key", RateLimit(10, 1.0, key="k"))
        await h.put_type("rl.keyed")
        await h.store.set_type_rate_limits([("rl.keyed", "per-key")], "api")
        ids = []
        for key in ("a", "b", "c"):
            task_id = uuid.uuid4()
            await h.store.enqueue([NewTask(task_id, "rl.keyed", f'{{"k": "{key}"}}')])
            ids.append(task_id)
        await h.store.claim(ids, "w1", 30.0)
        assert await h.store.prune_rate_buckets(60.0) == 0  # in use
        await asyncio.sleep(0.2)
        assert await h.store.prune_rate_buckets(0.05) == 3  # their slots passed
        # A bucket that comes back starts afresh.
        task_id = uuid.uuid4()
        await h.store.enqueue([NewTask(task_id, "rl.keyed", '{"k": "a"}')])
        (row,) = await h.store.claim([task_id], "w1", 30.0)
        assert isinstance(row, ClaimedTask)
