"""The admin API on the real Postgres and RabbitMQ: listings, cancel, retry, DLQ, purge, stats."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from taskq.settings import Settings
from taskq.store import Store
from taskq.web.http import key_label
from tests.support.api_fixtures import (
    JSON,
    assert_problem,
    declare_topology,
    drain,
    put_type,
    running_api,
)
from tests.support.services import delete_namespace, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings, relay=False) as client:
        await put_type(client, "a.v1")
        await put_type(client, "b.v1", queue="high")
        yield client


async def enqueue(api: httpx.AsyncClient, task_type: str = "a.v1", **fields: Any) -> str:
    response = await api.post("/enqueue", json={"type": task_type, "payload": {}, **fields})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def set_status(db: asyncpg.Connection, task_id: str, status: str) -> None:
    """Put a task into a status as a worker would have (test setup only)."""
    if status == "RUNNING":
        await db.execute(
            "UPDATE tasks SET status = 'RUNNING', attempts = 1, worker_id = 'w',"
            " lease_expires_at = now() + interval '1 hour', started_at = now() WHERE id = $1",
            uuid.UUID(task_id),
        )
    else:
        await db.execute(
            "UPDATE tasks SET status = $2, attempts = 1, finished_at = clock_timestamp(),"
            " started_at = now(), last_error = 'boom' WHERE id = $1",
            uuid.UUID(task_id),
            status,
        )


async def events(api: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/tasks/{task_id}/events")
    return list(response.json()["events"])


async def all_pages(api: httpx.AsyncClient, path: str, limit: int) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        body = (await api.get(path, params=params)).json()
        tasks += body["tasks"]
        cursor = body["next_cursor"]
        if cursor is None:
            return tasks


async def test_list_filters_and_pages(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    ids = [await enqueue(api) for _ in range(4)] + [await enqueue(api, "b.v1") for _ in range(2)]
    scheduled = await enqueue(api, delay=3600)
    await set_status(db, ids[0], "FAILED")
    listed = await all_pages(api, "/tasks", 3)
    assert [t["id"] for t in listed] == [scheduled, *reversed(ids)]
    assert [t["scheduled"] for t in listed] == [True] + [False] * 6
    assert set(listed[0]) >= {"status", "cancel_requested_at", "replays", "timeout"}

    async def ids_for(**params: Any) -> list[str]:
        response = await api.get("/tasks", params=params)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["tasks"]]

    assert await ids_for(type="b.v1") == ids[5:3:-1]
    assert await ids_for(queue="high") == ids[5:3:-1]
    assert await ids_for(status="FAILED") == [ids[0]]
    assert set(await ids_for(status="FAILED,ENQUEUED")) == {*ids, scheduled}
    assert await ids_for(scheduled="true") == [scheduled]
    assert len(await ids_for(scheduled="false")) == 6
    created = (await api.get(f"/tasks/{ids[3]}")).json()["created_at"]
    assert await ids_for(created_after=created) == [scheduled, ids[5], ids[4]]
    assert await ids_for(created_before=created) == ids[2::-1]
    assert await ids_for(type="nothing.v1") == []

    for params, field in [
        ({"status": "DONE"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2030-01-01T00:00:00"}, "created_before"),
        ({"scheduled": "maybe"}, "scheduled"),
        ({"type": "bad type"}, "type"),
        ({"queue": "Bad!"}, "queue"),
    ]:
        assert_problem(await api.get("/tasks", params=params), 400, field)


async def test_pages_are_stable_under_concurrent_inserts(api: httpx.AsyncClient) -> None:
    before = {await enqueue(api) for _ in range(40)}
    stop = asyncio.Event()

    async def insert() -> int:
        n = 0
        while not stop.is_set():
            await enqueue(api)
            n += 1
        return n

    inserter = asyncio.create_task(insert())
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        body = (await api.get("/tasks", params=params)).json()
        seen += body["tasks"]
        cursor = body["next_cursor"]
        await asyncio.sleep(0.02)  # let inserts land between pages
        if cursor is None:
            break
    stop.set()
    inserted = await inserter
    ids = [t["id"] for t in seen]
    assert inserted > 0
    assert len(ids) == len(set(ids)), "a task was listed twice"
    assert before <= set(ids), "a task that existed before the first page was skipped"
    keys = [(t["created_at"], t["id"]) for t in seen]
    assert keys == sorted(keys, reverse=True)


async def test_cancel_by_status(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    task = await enqueue(api)
    response = await api.post(f"/tasks/{task}/cancel", json={"reason": "not needed"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "CANCELLED" and response.json()["finished_at"]
    last = (await events(api, task))[-1]
    assert (last["status"], last["previous_status"]) == ("CANCELLED", "ENQUEUED")
    assert (last["action"], last["actor"], last["reason"]) == ("cancel", "api", "not needed")
    body = assert_problem(await api.post(f"/tasks/{task}/cancel", headers=JSON), 409, "status")
    assert body["task_status"] == "CANCELLED"

    scheduled = await enqueue(api, delay=600)
    assert (await api.get(f"/tasks/{scheduled}")).json()["scheduled"] is True
    response = await api.post(f"/tasks/{scheduled}/cancel", headers=JSON)
    assert response.status_code == 200 and response.json()["status"] == "CANCELLED"
    assert response.json()["scheduled"] is False

    running = await enqueue(api)
    await set_status(db, running, "RUNNING")
    response = await api.post(f"/tasks/{running}/cancel", headers=JSON)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "RUNNING" and response.json()["cancel_requested_at"]
    again = await api.post(f"/tasks/{running}/cancel", headers=JSON)
    assert again.json()["cancel_requested_at"] == response.json()["cancel_requested_at"]
    requested = [e for e in await events(api, running) if e["action"] == "cancel_requested"]
    assert len(requested) == 1 and requested[0]["status"] == "RUNNING"

    for status in ("SUCCEEDED", "FAILED"):
        done = await enqueue(api)
        await set_status(db, done, status)
        body = assert_problem(await api.post(f"/tasks/{done}/cancel", headers=JSON), 409, "status")
        assert body["task_status"] == status
    assert_problem(await api.post(f"/tasks/{uuid.uuid4()}/cancel", headers=JSON), 404)
    assert_problem(await api.post("/tasks/nope/cancel", headers=JSON), 404)
    assert_problem(await api.post(f"/tasks/{task}/cancel", json={"reason": 5}), 400, "reason")
    assert_problem(await api.post(f"/tasks/{task}/cancel", json={"why": "x"}), 400, "why")
    assert_problem(await api.post(f"/tasks/{task}/cancel", json=[1]), 400, "body")


async def test_retry_is_fresh_published_and_guarded(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    task = await enqueue(api)
    assert len(await drain(settings, "default", expect=1)) == 1
    generation = await db.fetchval("SELECT generation FROM tasks WHERE id = $1", uuid.UUID(task))
    await set_status(db, task, "FAILED")
    response = await api.post(f"/tasks/{task}/retry", json={"reason": "fixed the bug"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["attempts"], body["replays"]) == ("ENQUEUED", 0, 1)
    [message] = await drain(settings, "default", expect=1)
    assert message.message_id == task
    last = (await events(api, task))[-1]
    assert (last["status"], last["action"], last["actor"]) == ("ENQUEUED", "retry", "api")
    assert last["reason"] == "fixed the bug"
    # Quickly again: it is ENQUEUED now, so nothing happens twice.
    assert_problem(await api.post(f"/tasks/{task}/retry", headers=JSON), 409, "status")
    for status in ("RUNNING", "SUCCEEDED"):
        other = await enqueue(api)
        await set_status(db, other, status)
        assert_problem(await api.post(f"/tasks/{other}/retry", headers=JSON), 409, "status")
    cancelled = await enqueue(api)
    await api.post(f"/tasks/{cancelled}/cancel", headers=JSON)
    assert (await api.post(f"/tasks/{cancelled}/retry", headers=JSON)).json()[
        "status"
    ] == "ENQUEUED"
    assert_problem(await api.post(f"/tasks/{uuid.uuid4()}/retry", headers=JSON), 404)

    # A late confirm of the first publish (attempts 0, ENQUEUED, like the owed one
    # now) cannot mark the retry's publish as done: the generation moved on.
    await set_status(db, task, "FAILED")
    await db.execute(
        "UPDATE tasks SET status = 'ENQUEUED', attempts = 0, finished_at = NULL,"
        " published_at = NULL, generation = generation + 1 WHERE id = $1",
        uuid.UUID(task),
    )
    store = api.app.state.client.store  # type: ignore[attr-defined]
    await store.mark_published([(uuid.UUID(task), generation)])
    assert (
        await db.fetchval("SELECT published_at FROM tasks WHERE id = $1", uuid.UUID(task)) is None
    )
    current = await db.fetchval("SELECT generation FROM tasks WHERE id = $1", uuid.UUID(task))
    await store.mark_published([(uuid.UUID(task), current)])
    assert await db.fetchval("SELECT published_at FROM tasks WHERE id = $1", uuid.UUID(task))


async def test_dlq_lists_and_replays_once(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    failed = [await enqueue(api), await enqueue(api), await enqueue(api, "b.v1")]
    assert len(await drain(settings, "default", expect=2)) == 2
    assert len(await drain(settings, "high", expect=1)) == 1
    for task in failed:
        await set_status(db, task, "FAILED")
    await enqueue(api)  # not failed: never listed or replayed
    body = (await api.get("/dlq")).json()
    assert [t["id"] for t in body["tasks"]] == failed[::-1]
    assert body["broker_messages"] == 0 and body["next_cursor"] is None
    assert [t["id"] for t in await all_pages(api, "/dlq", 2)] == failed[::-1]
    assert [t["id"] for t in (await api.get("/dlq", params={"type": "b.v1"})).json()["tasks"]] == [
        failed[2]
    ]

    first = (await api.post("/dlq/replay", json={"type": "a.v1"})).json()
    assert first["replayed"] == 2 and set(first["ids"]) == set(failed[:2])
    second = (await api.post("/dlq/replay", json={"type": "a.v1"})).json()
    assert second == {"replayed": 0, "ids": [], "more": False}
    rest = await api.post("/dlq/replay", headers=JSON)  # no body: all
    assert rest.json()["ids"] == [failed[2]]
    assert (await api.post("/dlq/replay", json={})).json()["replayed"] == 0
    assert (await api.get("/dlq")).json()["tasks"] == []
    for task in failed:
        row = (await api.get(f"/tasks/{task}")).json()
        assert (row["status"], row["attempts"], row["replays"]) == ("ENQUEUED", 0, 1)
        assert (await events(api, task))[-1]["action"] == "replay"
    # The two replayed and the task that never failed.
    assert len(await drain(settings, "default", expect=3)) == 3
    assert len(await drain(settings, "high", expect=1)) == 1

    await set_status(db, failed[0], "FAILED")
    await set_status(db, failed[1], "FAILED")
    by_id = (await api.post("/dlq/replay", json={"ids": [failed[1]]})).json()
    assert by_id["ids"] == [failed[1]]
    assert (await api.get(f"/tasks/{failed[0]}")).json()["status"] == "FAILED"
    assert_problem(await api.post("/dlq/replay", json={"ids": ["x"]}), 400, "ids[0]")
    assert_problem(await api.post("/dlq/replay", json={"queue": "nope"}), 400, "queue")
    assert_problem(await api.post("/dlq/replay", json={"all": True}), 400, "all")
    assert_problem(await api.post("/dlq/replay", json=[]), 400, "body")
    assert_problem(await api.get("/dlq", params={"limit": "0"}), 400, "limit")


async def test_purge_queue(api: httpx.AsyncClient, settings: Settings) -> None:
    doomed = [await enqueue(api) for _ in range(5)]
    scheduled = await enqueue(api, delay=600)
    kept = await enqueue(api, "b.v1")
    # Wait until the five envelopes are in the work queue.
    for _ in range(100):
        depth = (await api.get("/stats")).json()["broker"]["queues"]
        if depth[settings.topology().names.queue("default")]["messages"] == 5:
            break
        await asyncio.sleep(0.1)
    assert_problem(await purge(api, "default"), 400, "confirm")
    assert_problem(await purge(api, "default", confirm="high"), 400, "confirm")
    assert_problem(await purge(api, "nope", confirm="nope"), 404)
    response = await purge(api, "default", confirm="default")
    assert response.status_code == 200, response.text
    assert response.json() == {"queue": "default", "purged_messages": 5, "cancelled": 6}
    for task in [*doomed, scheduled]:
        row = (await api.get(f"/tasks/{task}")).json()
        assert row["status"] == "CANCELLED"
        last = (await events(api, task))[-1]
        assert (last["action"], last["reason"]) == ("purge", "queue purged")
    assert (await api.get(f"/tasks/{kept}")).json()["status"] == "ENQUEUED"
    assert await drain(settings, "default", expect=0, timeout=0.5) == []
    assert len(await drain(settings, "high", expect=1)) == 1


async def purge(api: httpx.AsyncClient, queue: str, **params: str) -> httpx.Response:
    return await api.request("DELETE", f"/queues/{queue}", params=params, headers=JSON)


async def test_stats(api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings) -> None:
    tasks = [await enqueue(api) for _ in range(3)] + [await enqueue(api, "b.v1")]
    await enqueue(api, delay=600)
    await set_status(db, tasks[0], "SUCCEEDED")
    await set_status(db, tasks[1], "FAILED")
    body = (await api.get("/stats")).json()
    assert body["by_status"] == {
        "ENQUEUED": 3, "WAITING": 0, "RUNNING": 0, "SUCCEEDED": 1, "FAILED": 1, "CANCELLED": 0
    }  # fmt: skip
    assert body["scheduled"] == 1
    assert (
        body["by_queue"]["default"]["ENQUEUED"] == 2 and body["by_queue"]["high"]["ENQUEUED"] == 1
    )
    assert body["by_type"]["a.v1"]["SUCCEEDED"] == 1 and body["by_type"]["b.v1"]["ENQUEUED"] == 1
    assert body["estimated"] == []  # a small table: every count exact
    assert body["throughput"]["window_seconds"] == 60
    assert body["throughput"]["enqueued_per_second"] == pytest.approx(5 / 60)
    assert body["throughput"]["succeeded_per_second"] == pytest.approx(1 / 60)
    assert body["latency"]["duration_p50"] is not None
    names = settings.topology().names
    queues = body["broker"]["queues"]
    assert body["broker"]["available"] is True
    assert queues[names.queue("default")]["kind"] == "work"
    assert queues[names.dlq]["kind"] == "dlq"
    assert queues[names.delay(0)]["kind"] == "delay"
    assert len(queues) == len(settings.queues) + settings.topology().levels + 1


async def test_stats_of_a_large_table_estimate_the_successes_alone(
    api: httpx.AsyncClient, db: asyncpg.Connection, database_url: str
) -> None:
    # A terminal status at or above the threshold (2 here: SUCCEEDED) is the planner's
    # estimate and no longer counted by queue or type; the others are still exact.
    tasks = [await enqueue(api) for _ in range(4)] + [await enqueue(api, "b.v1")]
    for task in tasks[:2]:
        await set_status(db, task, "SUCCEEDED")
    await set_status(db, tasks[2], "FAILED")
    await db.execute("ANALYZE taskq.tasks")  # the estimate reads the table's statistics
    store = await Store.connect(database_url)
    try:
        exact = (await store.stats(60)).counts
        estimated = (await store.stats(60, exact_below=2)).counts
    finally:
        await store.close()
    assert exact.estimated == () and exact.by_status["SUCCEEDED"] == 2
    assert estimated.estimated == ("SUCCEEDED",)
    assert estimated.by_status == {
        "ENQUEUED": 2, "WAITING": 0, "RUNNING": 0, "SUCCEEDED": 2, "FAILED": 1, "CANCELLED": 0
    }  # fmt: skip
    assert estimated.by_queue["default"] == {
        "ENQUEUED": 1, "WAITING": 0, "RUNNING": 0, "FAILED": 1, "CANCELLED": 0
    }  # fmt: skip
    assert "SUCCEEDED" not in estimated.by_type["a.v1"]


async def test_stats_without_broker(database_url: str, namespace: str) -> None:
    settings = make_settings(
        database_url=database_url, amqp_url="amqp://guest:guest@127.0.0.1:1/", namespace=namespace
    )
    async with running_api(settings, relay=False) as api:
        response = await api.get("/stats")
        assert response.status_code == 200
        assert response.json()["broker"] == {"available": False, "queues": {}}
        dlq = (await api.get("/dlq")).json()
        assert dlq["broker_messages"] is None


ADMIN_REQUESTS = [
    ("GET", "/tasks"),
    ("GET", "/stats"),
    ("GET", "/stream"),
    ("GET", "/workers"),
    ("GET", "/dlq"),
    ("POST", "/dlq/replay"),
    ("POST", "/tasks/{id}/cancel"),
    ("POST", "/tasks/{id}/retry"),
    ("DELETE", "/queues/default?confirm=default"),
]


async def test_admin_endpoints_need_the_key(
    database_url: str, amqp_url: str, namespace: str
) -> None:
    settings = make_settings(
        database_url=database_url, amqp_url=amqp_url, namespace=namespace, api_keys="k1,k2"
    )
    await declare_topology(settings)
    try:
        async with running_api(settings, relay=False) as api:
            task = uuid.uuid4()
            for method, path in ADMIN_REQUESTS:
                response = await api.request(method, path.format(id=task))
                assert_problem(response, 401, "authorization")
                wrong = {"Authorization": "Bearer k3"}
                response = await api.request(method, path.format(id=task), headers=wrong)
                assert_problem(response, 401, "authorization")
            key = {"Authorization": "Bearer k2"}
            response = await api.put("/types/a.v1", json={}, headers=key)
            assert response.status_code == 201
            created = await api.post("/enqueue", json={"type": "a.v1", "payload": {}}, headers=key)
            task_id = created.json()["id"]
            for method, path in ADMIN_REQUESTS:
                if path == "/stream":
                    continue  # tested with a real server in test_stream.py
                headers = {**key, **JSON}
                response = await api.request(method, path.format(id=task_id), headers=headers)
                assert response.status_code < 400 or response.status_code == 409, (path, response)
            history = (await api.get(f"/tasks/{task_id}/events", headers=key)).json()["events"]
            assert history[-1]["actor"] == key_label("k2") != key_label("k1")
            assert "k2" not in key_label("k2")
    finally:
        await delete_namespace(settings)
