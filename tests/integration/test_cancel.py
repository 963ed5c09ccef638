"""Cancelling with a real worker: cooperative, forced after the grace, scheduled; GET /workers."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from taskq import demo
from taskq.amqp.envelope import Envelope
from taskq.handlers import Context, Registry
from taskq.settings import Settings
from taskq.store import NewTask, Store
from tests.support.api_fixtures import JSON, declare_topology, running_api
from tests.support.worker_fixtures import Harness, harness, metric, running_worker

pytestmark = pytest.mark.integration

handlers = Registry()
started: dict[str, asyncio.Event] = {}


@handlers.task("cancel.polite", timeout=60)
async def polite(payload: dict[str, Any], ctx: Context) -> str:
    started[str(ctx.task_id)].set()
    await ctx.cancelled()
    assert ctx.cancel_requested
    return "stopped early"


@handlers.task("cancel.stubborn", timeout=60)
async def stubborn(payload: dict[str, Any], ctx: Context) -> str:
    started[str(ctx.task_id)].set()
    await asyncio.sleep(60)
    return "finished"


def fast(settings: Settings) -> Settings:
    # A 3 s lease: the heartbeat, which carries cancel requests, runs every second.
    return settings.model_copy(update={"lease_seconds": 3.0})


async def cancel_running(api: httpx.AsyncClient, task_id: uuid.UUID) -> None:
    await asyncio.wait_for(started[str(task_id)].wait(), 15)
    response = await api.post(f"/tasks/{task_id}/cancel", json={"reason": "stop it"})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("task_type", ["cancel.polite", "cancel.stubborn"])
async def test_cancel_running_task(settings: Settings, task_type: str) -> None:
    settings = fast(settings)
    async with (
        harness(settings) as h,
        running_api(settings, relay=False) as api,
        running_worker(settings, handlers, cancel_grace=0.5) as worker,
    ):
        task_id = uuid.uuid4()
        started[str(task_id)] = asyncio.Event()
        await h.put_type(task_type)
        await enqueue_with_id(h, task_type, task_id)
        await cancel_running(api, task_id)
        row = await h.wait_for(task_id, "CANCELLED", timeout=15)
        assert row.finished_at is not None and row.attempts == 1
        history = await h.events(task_id)
        assert [e.status for e in history] == ["ENQUEUED", "RUNNING", "RUNNING", "CANCELLED"]
        request = history[2]
        assert (request.action, request.actor, request.reason) == (
            "cancel_requested", "api", "stop it",
        )  # fmt: skip
        assert history[3].error.startswith("Cancelled:")
        labels = {"type": task_type, "queue": "default", "outcome": "cancelled"}
        assert metric(worker, "taskq_tasks_processed_total", **labels) == 1
        # Nothing was published for it: it never runs again.
        await asyncio.sleep(1.0)
        assert (await h.task(task_id)).status == "CANCELLED"


async def enqueue_with_id(h: Harness, task_type: str, task_id: uuid.UUID) -> None:
    """The harness's enqueue with a known id, so the handler's start event exists first."""
    [result] = await h.store.enqueue([NewTask(task_id, task_type, json.dumps({}))])
    assert result.outcome == "created"
    await h.publisher.publish(Envelope(task_id, task_type, 0), "default")


async def test_cancelled_scheduled_task_never_runs(settings: Settings) -> None:
    async with (
        harness(settings) as h,
        running_api(settings, relay=False) as api,
        running_worker(settings, demo.handlers) as worker,
    ):
        task_id = await h.enqueue("demo.noop", delay=2)
        listed = (await api.get("/tasks", params={"scheduled": "true"})).json()["tasks"]
        assert [t["id"] for t in listed] == [str(task_id)]
        assert (await api.post(f"/tasks/{task_id}/cancel", headers=JSON)).status_code == 200
        # The envelope comes out of the delay levels and is dropped by the claim.
        for _ in range(100):
            if metric(worker, "taskq_deliveries_total", queue="default", decision="terminal"):
                break
            await asyncio.sleep(0.1)
        assert metric(worker, "taskq_deliveries_total", queue="default", decision="terminal") == 1
        history = await h.events(task_id)
        assert [e.status for e in history] == ["ENQUEUED", "CANCELLED"]


async def test_lease_recovery_of_a_cancel_requested_task_cancels_it(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await declare_topology(settings)
    async with running_api(settings, relay=False) as api:
        await api.put("/types/x.v1", json={})
        task_id = (await api.post("/enqueue", json={"type": "x.v1", "payload": {}})).json()["id"]
        await db.execute(
            "UPDATE tasks SET status = 'RUNNING', attempts = 1, worker_id = 'dead',"
            " lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            uuid.UUID(task_id),
        )
        assert (await api.post(f"/tasks/{task_id}/cancel", headers=JSON)).status_code == 202
        await db.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 s' WHERE id = $1",
            uuid.UUID(task_id),
        )
    store = await Store.connect(settings.database_url)
    try:
        [row] = await store.recover_expired(10)
        assert row.status == "CANCELLED"
    finally:
        await store.close()


async def test_workers_lists_a_live_worker(settings: Settings) -> None:
    settings = fast(settings)
    async with harness(settings), running_api(settings, relay=False) as api:
        async with running_worker(settings, demo.handlers, concurrency=7) as worker:
            [listed] = (await api.get("/workers")).json()["workers"]
            assert listed["id"] == worker.worker_id and listed["alive"] is True
            assert listed["queues"] == settings.queues
            assert (listed["concurrency"], listed["in_flight"]) == (7, 0)
            first = listed["last_heartbeat"]
            await asyncio.sleep(2.5)
            [listed] = (await api.get("/workers")).json()["workers"]
            assert listed["last_heartbeat"] > first
        assert (await api.get("/workers")).json()["workers"] == []
