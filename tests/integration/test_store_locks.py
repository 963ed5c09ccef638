"""Batched statements that other processes run on the same rows lock them in id order.

The claim locks its rows in id order. A batch of another process that locked
the same rows in another order could deadlock with it; Postgres then aborts
one of them after ``deadlock_timeout``. That happened in fault scenario 2: after
a broker restart the sweeper republished tasks that workers were claiming
again from redeliveries. Each test here holds the lock of the *higher* of two
ids, lets the batch run (given the ids highest first) until it waits for that
lock, and checks that the batch took the lower id's lock first. Published
markers wait for no lock at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import pytest

from taskq.store import NewTask, Store, WorkerInfo

WORKER = WorkerInfo(
    id="w1",
    hostname="test",
    pid=1,
    queues=["default"],
    concurrency=1,
    prefetch=1,
    heartbeat_seconds=5,
)

pytestmark = pytest.mark.integration


async def two_tasks(store: Store) -> tuple[uuid.UUID, uuid.UUID]:
    """Two ENQUEUED, unpublished tasks, the higher id inserted first."""
    await store.put_task_type(
        "demo.echo",
        queue="default",
        max_attempts=3,
        timeout_seconds=30,
        backoff_json=None,
        payload_schema_json=None,
        enabled=True,
    )
    low, high = sorted([uuid.uuid4(), uuid.uuid4()])
    await store.enqueue([NewTask(high, "demo.echo", "{}"), NewTask(low, "demo.echo", "{}")])
    return low, high


async def waiting_for_a_lock(connection: asyncpg.Connection) -> None:
    for _ in range(200):
        waiting = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the batch never waited for the held lock")


Batch = Callable[[Store, uuid.UUID, uuid.UUID], Coroutine[Any, Any, object]]


async def claim(store: Store, low: uuid.UUID, high: uuid.UUID) -> object:
    return await store.claim([high, low], "w2", 30)


async def republish(store: Store, low: uuid.UUID, high: uuid.UUID) -> object:
    return await store.republish([high, low])


async def requeue(store: Store, low: uuid.UUID, high: uuid.UUID) -> object:
    # An operator's retry or DLQ replay of the two (ENQUEUED here: the lock order is
    # the same whatever the statuses asked for).
    return await store.as_operator("retry", "test", None, "requeue", [high, low], ["ENQUEUED"])


async def heartbeat(store: Store, low: uuid.UUID, high: uuid.UUID) -> object:
    # The claims' tokens (a plain read waits for no row lock).
    tokens = dict(await store.pool.fetch("SELECT id, claim_token FROM tasks"))
    return await store.heartbeat([(high, tokens[high]), (low, tokens[low])], WORKER, 30)


@pytest.mark.parametrize("batch", [claim, republish, requeue, heartbeat], ids=lambda b: b.__name__)
async def test_batches_lock_rows_in_id_order(database_url: str, batch: Batch) -> None:
    store = await Store.connect(database_url)
    holder = await asyncpg.connect(database_url)
    try:
        low, high = await two_tasks(store)
        if batch is heartbeat:
            claimed = await store.claim([low, high], "w1", 30)
            assert {row["decision"] for row in claimed} == {"claimed"}
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", high)
        running = asyncio.create_task(batch(store, low, high))
        try:
            await waiting_for_a_lock(holder)
            with pytest.raises(asyncpg.LockNotAvailableError):
                # Held by the batch already, if it went in id order.
                await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE NOWAIT", low)
        finally:
            await transaction.rollback()
            await running
    finally:
        await holder.close()
        await store.close()


async def test_mark_published_skips_a_locked_row_instead_of_waiting(database_url: str) -> None:
    """A row another transaction holds (a worker claiming it) is left as it is: the
    claim records the publish itself, and waiting queued claims behind markers."""
    store = await Store.connect(database_url)
    holder = await asyncpg.connect(database_url)
    try:
        low, high = await two_tasks(store)
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", high)
            await asyncio.wait_for(store.mark_published([(high, 0), (low, 0)]), 5)
        rows = await holder.fetch("SELECT id, published_at FROM tasks")
        published = {row["id"]: row["published_at"] is not None for row in rows}
        assert published == {low: True, high: False}
    finally:
        await holder.close()
        await store.close()
