"""The sweeper's duties: expired leases are taken back, lost envelopes are published again,
WAITING tasks whose release was missed are released."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from taskq.errors import StoreError
from taskq.fleet.leader import SessionLock
from taskq.fleet.relay import HEADER_REASON, Relay
from taskq.handlers import Context, Registry
from taskq.model import ClaimedTask, Concurrency
from taskq.settings import Settings
from tests.support.worker_fixtures import Harness, harness, make_sweeper, running_worker, until

pytestmark = pytest.mark.integration


async def claim_and_expire(h: Harness, task_id: uuid.UUID) -> None:
    [claim] = await h.store.claim([task_id], "dead-worker", 30.0)
    assert isinstance(claim, ClaimedTask)
    await h.store.pool.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
    )


async def test_expired_leases_are_recovered_and_published(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo", max_attempts=2)
        retried, exhausted = await h.enqueue("demo.echo"), await h.enqueue("demo.echo")
        await h.store.pool.execute("UPDATE tasks SET max_attempts = 1 WHERE id = $1", exhausted)
        live = await h.enqueue("demo.echo")
        assert len(await h.take(h.names.queue("default"), 3, 5)) == 3  # as workers would
        for task_id in (retried, exhausted):
            await claim_and_expire(h, task_id)
        await h.store.claim([live], "live-worker", 30.0)
        sweeper, link = await make_sweeper(h)
        try:
            assert await sweeper.recover_expired() == 2
            assert await sweeper.recover_expired() == 0
        finally:
            await sweeper.stop()
            await link.stop()
        assert sweeper.metrics is not None
        assert sweeper.metrics.registry.get_sample_value("taskq_lease_recoveries_total") == 2

        row = await h.task(retried)
        assert (row.status, row.attempts, row.worker_id) == ("ENQUEUED", 1, None)
        assert row.published_at is not None
        [envelope] = await h.take(h.names.queue("default"), 1, 5)
        assert envelope.message_id == str(retried)
        assert await h.take(h.names.queue("default"), 1, 0.3) == []

        row = await h.task(exhausted)
        assert row.status == "FAILED"
        [letter] = await h.dead_letters(1)
        assert letter.message_id == str(exhausted)
        assert letter.headers[HEADER_REASON] == (
            "lease expired: worker dead-worker stopped heartbeating"
        )
        assert (await h.task(live)).status == "RUNNING"


async def test_overdue_tasks_of_an_empty_queue_are_published_again(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        lost = await h.enqueue("demo.echo")
        await h.take(h.names.queue("default"), 1, 5)  # the broker "loses" its envelope
        sweeper, link = await make_sweeper(h, overdue_after=0.3, check_every=0)
        relay = Relay(h.store, settings.database_url, h.publisher, duties=sweeper.duties)
        try:
            # Not overdue yet.
            assert await sweeper.republish_lost() == 0
            await h.store.pool.execute(
                "UPDATE tasks SET run_at = run_at - interval '1 second',"
                " published_at = published_at - interval '1 second'"
            )
            # A ready message in the queue means the broker has not lost anything.
            waiting = await h.enqueue("demo.echo")
            assert await sweeper.republish_lost() == 0
            await h.take(h.names.queue("default"), 1, 5)
            await h.store.pool.execute(
                "UPDATE tasks SET run_at = run_at - interval '1 second',"
                " published_at = published_at - interval '1 second'"
            )
            # Empty queue and overdue tasks: both are owed again; the relay pays at once.
            await relay.pass_once()
            envelopes = await h.take(h.names.queue("default"), 2, 5)
            assert sorted(str(e.message_id) for e in envelopes) == sorted([str(lost), str(waiting)])
            assert (await h.task(lost)).published_at is not None
        finally:
            await relay.stop()
            await sweeper.stop()
            await link.stop()
        assert sweeper.metrics is not None
        assert (
            sweeper.metrics.registry.get_sample_value(
                "taskq_republished_total", {"queue": "default"}
            )
            == 2
        )


async def test_one_sweeper_is_active_and_another_takes_over(settings: Settings) -> None:
    async with harness(settings) as h:
        made = [
            await make_sweeper(h, database_url=settings.database_url, interval=0.1)
            for _ in range(3)
        ]
        sweepers = [sweeper for sweeper, _ in made]
        try:
            for sweeper in sweepers:
                await sweeper.start()
            await asyncio.sleep(0.5)
            assert sum(sweeper.active for sweeper in sweepers) == 1
            active = next(sweeper for sweeper in sweepers if sweeper.active)
            await active.stop()
            others = [sweeper for sweeper in sweepers if sweeper is not active]
            for _ in range(50):
                if any(sweeper.active for sweeper in others):
                    break
                await asyncio.sleep(0.1)
            assert sum(sweeper.active for sweeper in others) == 1
        finally:
            for sweeper, link in made:
                await sweeper.stop()
                await link.stop()


async def test_a_silent_leader_loses_its_lock_to_another_and_finds_out(
    settings: Settings,
) -> None:
    """The server ends a lock session idle for its idle timeout (only a frozen leader's
    is), which frees the lock; the old leader learns it before its next step."""
    silent = SessionLock(settings.database_url, 4242, "test", idle_timeout=1.0)
    standby = SessionLock(settings.database_url, 4242, "test", idle_timeout=1.0)
    try:
        assert await silent.hold()
        assert not await standby.hold()
        assert standby.connection is not None
        limits = [
            await standby.connection.fetchval(f"SHOW {name}")
            for name in ("idle_session_timeout", "tcp_keepalives_idle", "tcp_user_timeout")
        ]
        assert limits == ["1s", "5", "15000"]  # tcp_user_timeout shows milliseconds
        # The silent one sends nothing for a while, as if stopped; the standby keeps trying.
        deadline = asyncio.get_running_loop().time() + 20
        while not await standby.hold():
            assert asyncio.get_running_loop().time() < deadline, "the lock was never freed"
            await asyncio.sleep(0.2)
        with pytest.raises(StoreError):  # LockLost, or its connection is found dead
            await silent.ensure()
        assert not silent.held and standby.held
    finally:
        await silent.release()
        await standby.release()


repaired = Registry()


@repaired.task("stuck.run", timeout=30, concurrency={"key": "customer", "limit": 2})
async def stuck_run(payload: dict[str, Any], ctx: Context) -> None:
    return None


async def park_by_hand(
    h: Harness, task_type: str, reason: str, key: str | None, payload: str = "{}"
) -> uuid.UUID:
    """A task WAITING with nothing to release it: no envelope, and for a concurrency
    key, its slot row free (a release that was missed)."""
    task_id = uuid.uuid4()
    await h.store.pool.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
        " wait_reason, concurrency_key, published_at)"
        " VALUES ($1, $2, 'default', $3, 3, 30, 'WAITING', $4, $5, now())",
        task_id, task_type, payload, reason, key,
    )  # fmt: skip
    if key is not None:
        await h.store.pool.execute(
            "INSERT INTO concurrency_slots (type, key, running, lim) VALUES ($1, $2, 0, 2)"
            " ON CONFLICT DO NOTHING",
            task_type,
            key,
        )
    return task_id


async def test_missed_releases_of_waiting_tasks_are_repaired(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("resumed.t")
        await h.put_type("limited.t")
        await h.store.put_task_type(
            "limited.t", queue="default", max_attempts=3, timeout_seconds=30.0,
            backoff_json=None, payload_schema_json=None, enabled=True,
            concurrency=Concurrency(2, "k", "api"),
        )  # fmt: skip
        sweeper, link = await make_sweeper(h, repair_keys=1)
        try:
            # Nothing waits: nothing to do.
            assert await sweeper.repair_waiting(force=True) == 0
            # Key a is full (two running, a third parked by the claim): it stays WAITING.
            full = [await h.enqueue("limited.t", {"k": "a"}) for _ in range(3)]
            rows = {r.id: r for r in await h.store.claim(full, "w", 30.0)}
            assert rows[full[2]].decision == "parked"
            stuck = await park_by_hand(h, "limited.t", "concurrency", "b", '{"k": "b"}')
            # Key c has room for one, taken by a task released and on its way: it waits.
            on_its_way = await park_by_hand(h, "limited.t", "concurrency", "c", '{"k": "c"}')
            await h.store.pool.execute(
                "UPDATE tasks SET status = 'ENQUEUED', wait_reason = NULL WHERE id = $1",
                on_its_way,
            )
            await h.store.pool.execute("UPDATE concurrency_slots SET running = 1 WHERE key = 'c'")
            behind = await park_by_hand(h, "limited.t", "concurrency", "c", '{"k": "c"}')
            resumed = await park_by_hand(h, "resumed.t", "paused", None)
            paused = await park_by_hand(h, "limited.t", "paused", None)
            await h.store.pause_type("limited.t", True)
            assert await h.store.waiting_keys(("", ""), 10) == [
                ("limited.t", "a", False),
                ("limited.t", "b", True),
                ("limited.t", "c", False),
            ]
            # Not before its interval is over.
            assert await sweeper.repair_waiting() == 0
            # One key per pass (repair_keys=1): a, then b; the resumed type's at once.
            assert await sweeper.repair_waiting(force=True) == 1
            assert (await h.task(resumed)).status == "ENQUEUED"
            assert (await h.task(stuck)).status == "WAITING"
            assert await sweeper.repair_waiting(force=True) == 1
            row = await h.task(stuck)
            assert (row.status, row.wait_reason) == ("ENQUEUED", None)
            # c, then around again: a and c have no room, the paused type's task waits.
            for _ in range(4):
                assert await sweeper.repair_waiting(force=True) == 0
            assert (await h.task(full[2])).status == "WAITING"
            assert (await h.task(behind)).status == "WAITING"
            assert (await h.task(paused)).status == "WAITING"
            # Released with their publishes owed.
            owed = await h.store.owed_among([stuck, resumed, full[2], paused, behind])
            assert sorted(o.id for o in owed) == sorted([stuck, resumed])
        finally:
            await sweeper.stop()
            await link.stop()
        assert sweeper.metrics is not None
        for reason in ("concurrency", "paused"):
            assert (
                sweeper.metrics.registry.get_sample_value(
                    "taskq_waiting_repaired_total", {"reason": reason}
                )
                == 1
            )


async def test_a_workers_sweeper_releases_a_stuck_waiting_task_and_it_runs(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"sweeper_check_every": 0.5})
    async with harness(settings) as h, running_worker(settings, repaired):

        async def registered() -> bool:
            return any(t.name == "stuck.run" for t in await h.store.task_types())

        await until(registered, "the worker did not register its type")
        task_id = await park_by_hand(h, "stuck.run", "concurrency", "c1", '{"customer": "c1"}')
        row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        assert row.attempts == 1
        history = [e.status for e in await h.events(task_id)]
        assert history[-3:] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
        async with h.store.pool.acquire() as connection:
            running = await connection.fetchval(
                "SELECT running FROM concurrency_slots WHERE type = 'stuck.run' AND key = 'c1'"
            )
        assert running == 0
