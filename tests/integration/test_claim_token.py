"""Heartbeats and outcomes are guarded by the claim's token: after an operator's retry the
same worker may hold attempt 1 of a task again, and its earlier attempt 1 changes nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sized
from typing import Any

import asyncpg
import pytest

from taskq import sql
from taskq.amqp.envelope import Envelope
from taskq.handlers import Context, Registry
from taskq.model import ClaimedTask, TaskStatus
from taskq.settings import Settings
from taskq.store import NewTask, Store, WorkerInfo
from tests.support.worker_fixtures import harness, metric, poll, running_worker

pytestmark = pytest.mark.integration

WORKER = WorkerInfo("w1", "test", 1, ["default"], 1, 1, 5.0)


async def fail_by_the_sweeper(database_url: str, task_id: uuid.UUID) -> None:
    """The lease runs out and the sweeper takes the task back: FAILED, no attempt left
    (in one transaction, so no heartbeat extends the lease in between)."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                task_id,
            )
            [row] = await connection.fetch(sql.queries()["recover_expired"], 10)
        assert (row["id"], row["status"]) == (task_id, "FAILED")
    finally:
        await connection.close()


async def retry_by_an_operator(store: Store, task_id: uuid.UUID) -> None:
    [row] = await store.requeue(
        [task_id], [TaskStatus.FAILED], action="retry", actor="test", reason=None
    )
    assert (row.status, row.attempts) == (TaskStatus.ENQUEUED, 0)


Stale = Callable[[Store, uuid.UUID, uuid.UUID], Awaitable[Sized]]
STALE: dict[str, Stale] = {
    "complete": lambda s, i, t: s.complete([(i, t, '"stale"')]),
    "retry": lambda s, i, t: s.retry([(i, t, "stale", 0.0)]),
    "fail": lambda s, i, t: s.fail([(i, t, "stale")]),
    "give_back": lambda s, i, t: s.give_back([(i, t)]),
    "cancel_running": lambda s, i, t: s.cancel_running([(i, t)]),
    "heartbeat": lambda s, i, t: s.heartbeat([(i, t)], WORKER, 30.0),
}


@pytest.mark.parametrize("statement", sorted(STALE))
async def test_a_claim_before_an_operators_retry_changes_nothing(
    database_url: str, statement: str
) -> None:
    store = await Store.connect(database_url)
    try:
        await store.put_task_type(
            "demo.echo", queue="default", max_attempts=1, timeout_seconds=30,
            backoff_json=None, payload_schema_json=None, enabled=True,
        )  # fmt: skip
        task_id = uuid.uuid4()
        await store.enqueue([NewTask(task_id, "demo.echo", "{}")])
        [first] = await store.claim([task_id], "w1", 30.0)
        await fail_by_the_sweeper(database_url, task_id)
        await retry_by_an_operator(store, task_id)
        [second] = await store.claim([task_id], "w1", 30.0)
        # The same task, attempt and worker: only the token tells the claims apart.
        assert isinstance(first, ClaimedTask) and isinstance(second, ClaimedTask)
        assert second.attempts == first.attempts
        assert second.claim_token != first.claim_token
        before = await store.task(task_id)

        assert not await STALE[statement](store, task_id, first.claim_token)
        assert await store.task(task_id) == before
        assert await STALE[statement](store, task_id, second.claim_token)
        if statement != "heartbeat":  # the claim is over: its token no longer holds either
            assert not await STALE[statement](store, task_id, second.claim_token)
    finally:
        await store.close()


def twice(runs: list[asyncio.Event]) -> Registry:
    registry = Registry()

    @registry.task("test.twice", max_attempts=1)
    async def wait_for_the_test(payload: dict[str, Any], ctx: Context) -> int:
        release = asyncio.Event()
        runs.append(release)
        number = len(runs)
        await release.wait()
        return number

    return registry


async def test_a_stale_outcome_after_an_operators_retry_is_refused(
    settings: Settings, database_url: str
) -> None:
    runs: list[asyncio.Event] = []
    async with harness(settings) as h, running_worker(settings, twice(runs)) as worker:
        task_id = await h.enqueue("test.twice")
        await poll(lambda: len(runs) == 1, "the first run never started")
        # Its lease lapses (say the worker's heartbeats stalled), the sweeper fails the
        # task, an operator retries it, and the same worker claims attempt 1 again.
        await fail_by_the_sweeper(database_url, task_id)
        await retry_by_an_operator(h.store, task_id)
        await h.publisher.publish(Envelope(task_id, "test.twice", 0), "default")
        await poll(lambda: len(runs) == 2, "the retried task never ran again")

        runs[0].set()  # the first run ends: its outcome is refused
        labels = {"type": "test.twice", "queue": "default"}
        await poll(
            lambda: metric(worker, "taskq_tasks_processed_total", **labels, outcome="stale") == 1,
            "the first run's outcome was not refused as stale",
        )
        row = await h.task(task_id)
        assert (row.status, row.attempts, row.result) == ("RUNNING", 1, None)

        runs[1].set()
        row = await h.wait_for(task_id, "SUCCEEDED")
        assert row.result is not None
        assert json.loads(row.result) == 2
        assert metric(worker, "taskq_tasks_processed_total", **labels, outcome="succeeded") == 1
