"""Rate limits enforced by the claim (taskq.ratelimits): starts spaced by the limit
across workers, per-key buckets, a reservation claimed without a second slot, and
no attempt counted for the wait."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import datetime, timedelta

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


async def test_a_reservation_is_claimed_without_a_second_slot(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("rl.slow")
        await h.store.set_type_rate_limits([("rl.slow", RateLimit(1, 2.0))], "api")
        ids = []
        for _ in range(3):
            task_id = uuid.uuid4()
            await h.store.enqueue([NewTask(task_id, "rl.slow", "{}")])
            ids.append(task_id)
        rows = {r.id: r for r in await h.store.claim(ids, "w1", 30.0)}
        decisions = sorted(decision(r) for r in rows.values())
        assert decisions == ["claimed", "limited", "limited"]
        waits = sorted(
            r.delay for r in rows.values() if isinstance(r, Unclaimed) and r.decision == "limited"
        )
        # Slots 2 s apart: about 2 s and 4 s from now.
        assert 1.0 < waits[0] <= 2.0 and 3.0 < waits[1] <= 4.0 and waits[1] - waits[0] > 1.9
        waiting = [i for i in ids if decision(rows[i]) == ClaimDecision.LIMITED]
        record = await h.task(waiting[0])
        assert record.status == "ENQUEUED" and record.attempts == 0
        assert record.limited_by == ratelimits.own_limiter("rl.slow")
        assert record.limited_until is not None and record.limited_until == record.run_at
        # Before its slot it is early (not limited again); at its slot it is claimed
        # although the bucket's next slot is 4 s away.
        (again,) = await h.store.claim([waiting[0]], "w1", 30.0)
        assert isinstance(again, Unclaimed) and again.decision == ClaimDecision.EARLY
        await asyncio.sleep(max(0.0, again.delay) + 0.05)
        (claimed,) = await h.store.claim([waiting[0]], "w1", 30.0)
        assert isinstance(claimed, ClaimedTask)
        record = await h.task(waiting[0])
        assert record.limited_until is None and record.attempts == 1
        assert record.started_at is not None and record.started_at >= record.run_at


async def test_the_claim_takes_the_slots_gcra_gives(settings: Settings) -> None:
    """The statement's arithmetic against taskq.ratelimits.slots, with a burst."""
    limit = RateLimit(10, 1.0, burst=3)
    async with harness(settings) as h:
        await h.put_type("rl.burst")
        await h.store.set_type_rate_limits([("rl.burst", limit)], "api")
        ids = []
        for _ in range(6):
            task_id = uuid.uuid4()
            await h.store.enqueue([NewTask(task_id, "rl.burst", "{}")])
            ids.append(task_id)
        rows = await h.store.claim(ids, "w1", 30.0)
        # Three start at once (the burst), then one each 100 ms.
        assert [decision(r) for r in rows].count(ClaimDecision.CLAIMED) == 3
        slots = sorted(
            [(await h.task(r.id)).run_at for r in rows if decision(r) == ClaimDecision.LIMITED]
        )
        expected, _ = ratelimits.slots(None, slots[0] - timedelta(seconds=0.3), 6, limit)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
        assert gaps == pytest.approx([0.1, 0.1], abs=1e-6)
        assert [(e - expected[3]).total_seconds() for e in expected[3:]] == pytest.approx(
            [(s - slots[0]).total_seconds() for s in slots], abs=1e-6
        )


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
