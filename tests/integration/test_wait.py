"""Waiting for results: ``Client.wait`` and ``Client.call`` woken by LISTEN/NOTIFY, through
the real services: success, failure, cancel, timeout, a task already ended, many waiters
on one connection, the connection killed while waiting, and the waiter limit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from taskq import store
from taskq.client import Client
from taskq.errors import (
    Fail,
    InvalidRequest,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TooManyWaiters,
    WaitTimeout,
)
from taskq.handlers import Context, Registry
from taskq.model import TaskStatus
from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology
from tests.support.worker_fixtures import poll, running_worker, until

pytestmark = pytest.mark.integration


def handlers(gate: asyncio.Event) -> Registry:
    registry = Registry()

    @registry.task("wait.double", max_attempts=1)
    async def double(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"n": payload["n"] * 2}

    @registry.task("wait.gated", max_attempts=1)
    async def gated(payload: dict[str, Any], ctx: Context) -> str:
        await gate.wait()
        return "opened"

    @registry.task("wait.fail", max_attempts=1)
    async def fail(payload: dict[str, Any], ctx: Context) -> None:
        raise Fail("the input is wrong")

    return registry


@asynccontextmanager
async def system(settings: Settings, gate: asyncio.Event | None = None) -> AsyncIterator[Client]:
    await declare_topology(settings)
    async with (
        running_worker(settings, handlers(gate or asyncio.Event())),
        Client.connect(settings) as client,
    ):
        yield client


async def listening_backends(db: asyncpg.Connection) -> list[int]:
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'taskq waiters%'"
        " AND datname = current_database()"
    )
    return [row["pid"] for row in rows]


async def test_wait_and_call_return_a_result(settings: Settings) -> None:
    async with system(settings) as client:
        assert await client.call("wait.double", {"n": 21}, timeout=30) == {"n": 42}
        enqueued = await client.enqueue("wait.double", {"n": 5})
        task = await client.wait(enqueued.id, timeout=30)
        assert (task.status, task.result_value()) == (TaskStatus.SUCCEEDED, {"n": 10})
        assert task.finished_at is not None
        # A task that ended already is answered at once, also by its id as text.
        again = await client.wait(str(enqueued.id), timeout=0)
        assert again.status is TaskStatus.SUCCEEDED


async def test_a_failed_task_raises_with_its_reason(settings: Settings) -> None:
    async with system(settings) as client:
        enqueued = await client.enqueue("wait.fail", {})
        with pytest.raises(TaskFailed) as raised:
            await client.wait(enqueued.id, timeout=30)
        assert "the input is wrong" in raised.value.reason
        assert raised.value.task.status is TaskStatus.FAILED
        with pytest.raises(TaskFailed):
            await client.call("wait.fail", {}, timeout=30)


async def test_a_cancelled_task_raises_with_the_operators_reason(settings: Settings) -> None:
    async with system(settings) as client:
        enqueued = await client.enqueue("wait.double", {"n": 1}, delay=3600)
        waiter = asyncio.create_task(client.wait(enqueued.id, timeout=60))
        await poll(lambda: client.waiters.waiting == 1, "the waiter did not start")
        await asyncio.sleep(0.2)  # let it mark the task, or not: either way it must wake
        status = await client.store.cancel(enqueued.id, actor="test", reason="not needed")
        assert status is TaskStatus.CANCELLED
        with pytest.raises(TaskCancelled) as raised:
            await asyncio.wait_for(waiter, 20)
        assert raised.value.reason == "not needed"
        assert raised.value.task.status is TaskStatus.CANCELLED


async def test_a_wait_times_out_with_the_task_as_it_is(settings: Settings) -> None:
    async with system(settings) as client:
        enqueued = await client.enqueue("wait.double", {"n": 1}, delay=3600)
        with pytest.raises(WaitTimeout) as raised:
            await client.wait(enqueued.id, timeout=0.5)
        assert raised.value.task.status is TaskStatus.ENQUEUED
        assert raised.value.timeout == 0.5
        assert client.waiters.waiting == 0


async def test_bad_waits_are_refused_and_enqueue_nothing(settings: Settings) -> None:
    async with system(settings) as client:
        with pytest.raises(TaskNotFound):
            await client.wait(uuid.uuid4(), timeout=5)
        with pytest.raises(InvalidRequest) as raised:
            await client.wait("not-an-id", timeout=-1)
        assert [e.field for e in raised.value.errors] == ["task_id", "timeout"]
        with pytest.raises(InvalidRequest):
            await client.call("wait.double", {"n": 1}, timeout=float("nan"))
        assert sum((await client.store.stats(60)).counts.by_status.values()) == 0


async def test_many_waiters_share_one_listening_connection(
    settings: Settings, db: asyncpg.Connection
) -> None:
    gate = asyncio.Event()
    async with system(settings, gate) as client:
        ids = [(await client.enqueue("wait.gated", {})).id for _ in range(20)]
        waiters = [client.wait(task_id, timeout=60) for task_id in ids]
        waiters += [client.wait(ids[0], timeout=60) for _ in range(30)]  # one task, many waits
        running = [asyncio.ensure_future(w) for w in waiters]
        await poll(lambda: client.waiters.waiting == 50, "the waiters did not all start")
        assert len(await listening_backends(db)) == 1
        gate.set()
        tasks = await asyncio.wait_for(asyncio.gather(*running), 60)
        assert {t.status for t in tasks} == {TaskStatus.SUCCEEDED}
        assert [t.id for t in tasks[:20]] == ids
        assert client.waiters.waiting == 0 and client.waiters.connects == 1


async def test_a_waiter_wakes_after_its_connection_was_killed(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection dies, the task ends while nobody listens (its notification is lost),
    and the waiter learns it once the connection is back."""
    gate = asyncio.Event()
    reconnect = asyncio.Event()
    listen = store.listen
    calls = 0

    async def held_listen(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if str(kwargs.get("name", "")).startswith("taskq waiters"):
            # The waiters' connection; the worker's queue pauses listen too.
            calls += 1
            if calls > 1:
                await reconnect.wait()
        return await listen(*args, **kwargs)

    monkeypatch.setattr(store, "listen", held_listen)
    async with system(settings, gate) as client:
        enqueued = await client.enqueue("wait.gated", {})
        waiter = asyncio.create_task(client.wait(enqueued.id, timeout=60))
        await poll(lambda: client.waiters.waiting == 1, "the waiter did not start")
        [pid] = await listening_backends(db)
        await until(lambda: marked(db, enqueued.id), "the waiter did not mark the task")
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        await poll(lambda: calls == 2, "the waiters did not try to listen again")
        gate.set()  # the task ends while nobody listens
        await until(lambda: ended(db, enqueued.id), "the task did not end")
        await asyncio.sleep(0.2)
        assert not waiter.done()
        reconnect.set()
        task = await asyncio.wait_for(waiter, 20)
        assert task.status is TaskStatus.SUCCEEDED
        assert client.waiters.connects == 2


async def marked(db: asyncpg.Connection, task_id: uuid.UUID) -> bool:
    return bool(await db.fetchval("SELECT wait_requested FROM taskq.tasks WHERE id = $1", task_id))


async def ended(db: asyncpg.Connection, task_id: uuid.UUID) -> bool:
    status = await db.fetchval("SELECT status FROM taskq.tasks WHERE id = $1", task_id)
    return bool(status == "SUCCEEDED")


async def test_waits_beyond_the_limit_are_refused(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_waiters": 1})
    async with system(settings) as client:
        enqueued = await client.enqueue("wait.double", {"n": 1}, delay=3600)
        first = asyncio.create_task(client.wait(enqueued.id, timeout=60))
        await poll(lambda: client.waiters.waiting == 1, "the waiter did not start")
        with pytest.raises(TooManyWaiters):
            await client.wait(enqueued.id, timeout=1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert client.waiters.waiting == 0


async def test_only_tasks_somebody_waits_for_send_a_notification(
    settings: Settings, db: asyncpg.Connection
) -> None:
    heard: list[str] = []
    await db.add_listener("taskq_finished", lambda *args: heard.append(args[3]))
    gate = asyncio.Event()
    async with system(settings, gate) as client:
        quiet = await client.enqueue("wait.gated", {})
        waited = await client.enqueue("wait.gated", {})
        waiter = asyncio.create_task(client.wait(waited.id, timeout=60))
        await until(lambda: marked(db, waited.id), "the waiter did not mark the task")
        gate.set()
        await asyncio.wait_for(waiter, 30)
        await until(lambda: ended(db, quiet.id), "the task did not end")
        await asyncio.sleep(0.3)
    assert heard == [str(waited.id)]
    assert not await marked(db, quiet.id)
