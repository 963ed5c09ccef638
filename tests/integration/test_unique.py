"""Unique tasks and debounce against the real Postgres and RabbitMQ: duplicates answered
with the holder (HTTP and client), races decided by the unique index (concurrent requests,
inside one batch, across batches, in callers' transactions), the states that hold a key,
the "for" bound, replace (debounce) with its republish, and the type's unique."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from taskq import Client, EnqueueResult, SyncClient
from taskq.handlers import Context, Registry
from taskq.model import ClaimedTask
from taskq.settings import Settings
from tests.support.api_fixtures import (
    assert_problem,
    declare_topology,
    drain,
    put_type,
    running_api,
)
from tests.support.worker_fixtures import harness, running_worker

pytestmark = pytest.mark.integration

BY_USER = {"key": "$.user"}


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings) as client:
        await put_type(client, "demo.echo")
        yield client


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(settings.database_url)
    yield connection
    await connection.close()


async def count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM taskq.tasks"))


def enqueue_body(user: Any, unique: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A ``POST /enqueue`` body of demo.echo for ``user``, unique per user by default."""
    return {"type": "demo.echo", "payload": {"user": user}, "unique": unique or BY_USER, **fields}


async def test_a_duplicate_answers_with_the_holder_and_creates_nothing(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    first = await api.post("/enqueue", json=enqueue_body(7))
    assert first.status_code == 201, first.text
    assert "unique-duplicate" not in first.headers and "duplicate" not in first.json()
    second = await api.post("/enqueue", json=enqueue_body(7.0))  # the same JSON number
    assert second.status_code == 200, second.text
    assert second.headers["unique-duplicate"] == "kept"
    assert "idempotent-replayed" not in second.headers
    assert second.json() == {**first.json(), "duplicate": True, "replaced": False}
    other = await api.post("/enqueue", json=enqueue_body(8))
    assert other.status_code == 201
    assert await count(db) == 2
    assert len(await drain(settings, "default", expect=3, timeout=3)) == 2

    task = (await api.get(f"/tasks/{first.json()['id']}")).json()
    assert task["unique"] == {
        "key": "demo.echo/$.user=7", "while": "active", "until": None, "held": True,
    }  # fmt: skip
    plain = (await api.post("/enqueue", json={"type": "demo.echo", "payload": {}})).json()
    assert (await api.get(f"/tasks/{plain['id']}")).json()["unique"] is None
    metrics = (await api.get("/metrics")).text
    assert (
        'taskq_enqueue_total{outcome="duplicate",queue="default",type="demo.echo"} 1.0' in metrics
    )


async def test_keys_literal_whole_payload_and_per_type(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await put_type(api, "demo.other")
    literal = {"key": "nightly-report"}
    a = await api.post("/enqueue", json=enqueue_body(1, literal))
    b = await api.post("/enqueue", json=enqueue_body(2, literal))
    assert (a.status_code, b.status_code) == (201, 200)
    assert b.json()["id"] == a.json()["id"]
    # Keys are per task type.
    c = await api.post("/enqueue", json={**enqueue_body(1, literal), "type": "demo.other"})
    assert c.status_code == 201
    # "$": the whole payload, keys in any order.
    whole = {"key": "$"}
    d = await api.post("/enqueue", json={**enqueue_body(0, whole), "payload": {"a": 1, "b": 2}})
    e = await api.post("/enqueue", json={**enqueue_body(0, whole), "payload": {"b": 2, "a": 1}})
    assert (d.status_code, e.status_code) == (201, 200)
    # A large value is keyed by its hash, within the column's bound.
    big = "x" * 5000
    f = await api.post("/enqueue", json=enqueue_body(big))
    g = await api.post("/enqueue", json=enqueue_body(big))
    assert (f.status_code, g.status_code) == (201, 200)
    key = await db.fetchval(
        "SELECT unique_key FROM taskq.tasks WHERE id = $1", uuid.UUID(f.json()["id"])
    )
    assert key.startswith("demo.echo/$.user=sha256:") and len(key) < 512
    assert await count(db) == 4


@pytest.mark.parametrize(
    ("unique", "field"),
    [
        ({"key": "$.nope"}, "unique.key"),
        ({"key": "$.user.deeper"}, "unique.key"),
        ({"key": "$..user"}, "unique.key"),
        ({"key": "k" * 256}, "unique.key"),
        ({"key": ""}, "unique.key"),
        ({"key": "a\x00b"}, "unique.key"),
        ({"while": "forever"}, "unique.while"),
        ({"for": "soon"}, "unique.for"),
        ({"for": 0.5}, "unique.for"),
        ({"for": "400d"}, "unique.for"),
        ({"on_conflict": "merge"}, "unique.on_conflict"),
        ({"keys": "$.user"}, "unique.keys"),
        ("user", "unique"),
    ],
)
async def test_a_bad_unique_is_a_400_naming_it_and_changes_nothing(
    api: httpx.AsyncClient, db: asyncpg.Connection, unique: Any, field: str
) -> None:
    body = {"type": "demo.echo", "payload": {"user": 1}, "unique": unique}
    assert_problem(await api.post("/enqueue", json=body), 400, field)
    batch = {"tasks": [enqueue_body(2), body]}
    assert_problem(await api.post("/enqueue/batch", json=batch), 400, f"tasks[1].{field}")
    assert await count(db) == 0


async def test_fifty_concurrent_enqueues_of_one_key_give_one_row(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    responses = await asyncio.gather(
        *(api.post("/enqueue", json=enqueue_body("u1", delay=i)) for i in range(50))
    )
    assert sorted(r.status_code for r in responses) == [200] * 49 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count(db) == 1
    assert len(await drain(settings, "default", expect=2, timeout=3)) == 1


async def test_fifty_concurrent_client_enqueues_and_batches_give_one_row(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    async with Client.connect(settings) as client:
        results = await asyncio.gather(
            *(client.enqueue("demo.echo", {"user": "c"}, unique=BY_USER) for _ in range(50))
        )
        assert sum(r.created for r in results) == 1
        assert sum(r.duplicate and not r.replaced for r in results) == 49
        assert len({r.id for r in results}) == 1
        # Inside one batch: the first of a key is created, the others are its duplicates.
        batch = await client.enqueue_many(
            "demo.echo", [{"user": "b"}, {"user": "b"}, {"user": "d"}], unique=BY_USER
        )
        assert [r.created for r in batch] == [True, False, True]
        assert batch[1].duplicate and batch[1].id == batch[0].id
        # Across concurrent batches (each in its transaction), over the same keys.
        payloads = [{"user": f"x{i % 10}"} for i in range(30)]
        batches = await asyncio.gather(
            *(client.enqueue_many("demo.echo", payloads, unique=BY_USER) for _ in range(10))
        )
    created = [r for b in batches for r in b if r.created]
    assert len(created) == 10
    assert all(r.duplicate for b in batches for r in b if not r.created)
    assert await count(db) == 1 + 2 + 10
    response = await api.post("/enqueue/batch", json={"tasks": [enqueue_body("y")] * 3})
    assert response.status_code == 201
    tasks = response.json()["tasks"]
    assert [(t["replayed"], t.get("duplicate", False)) for t in tasks] == [
        (False, False), (False, True), (False, True),
    ]  # fmt: skip


async def set_state(db: asyncpg.Connection, task_id: str, status: str) -> None:
    """Move a task as a worker would (a claim, then an outcome)."""
    ident = uuid.UUID(task_id)
    await db.execute(
        "UPDATE taskq.tasks SET status = 'RUNNING', attempts = 1, started_at = now(),"
        " lease_expires_at = now() + interval '1 minute', worker_id = 'w' WHERE id = $1",
        ident,
    )
    if status == "ENQUEUED":  # a retry
        await db.execute(
            "UPDATE taskq.tasks SET status = 'ENQUEUED', lease_expires_at = NULL,"
            " worker_id = NULL WHERE id = $1",
            ident,
        )
    elif status == "WAITING":  # a retry parked by the claim (its type paused)
        await db.execute(
            "UPDATE taskq.tasks SET status = 'WAITING', wait_reason = 'paused',"
            " lease_expires_at = NULL, worker_id = NULL WHERE id = $1",
            ident,
        )
    elif status != "RUNNING":
        await db.execute(
            "UPDATE taskq.tasks SET status = $2, finished_at = now(), lease_expires_at = NULL"
            " WHERE id = $1",
            ident,
            status,
        )


# Whether a task in each state (after it started) still holds its key.
HOLDS = {
    "queued": {
        "RUNNING": False, "ENQUEUED": False, "WAITING": False, "SUCCEEDED": False,
        "FAILED": False,
    },
    "active": {
        "RUNNING": True, "ENQUEUED": True, "WAITING": True, "SUCCEEDED": False, "FAILED": False,
    },
    "until_finished": {
        "RUNNING": True, "ENQUEUED": True, "WAITING": True, "SUCCEEDED": True, "FAILED": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(HOLDS))
async def test_while_says_which_states_hold_the_key(
    api: httpx.AsyncClient, db: asyncpg.Connection, mode: str
) -> None:
    for state, holds in HOLDS[mode].items():
        unique = {"key": "$.user", "while": mode}
        first = (await api.post("/enqueue", json=enqueue_body(state, unique))).json()
        # Not yet started: every mode holds it.
        assert (await api.post("/enqueue", json=enqueue_body(state, unique))).status_code == 200
        await set_state(db, first["id"], state)
        task = (await api.get(f"/tasks/{first['id']}")).json()
        assert task["unique"]["held"] is holds, (mode, state)
        again = await api.post("/enqueue", json=enqueue_body(state, unique))
        assert again.status_code == (200 if holds else 201), (mode, state)
        assert (again.json()["id"] == first["id"]) is holds


async def test_for_bounds_the_hold_in_time(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    unique = {"key": "$.user", "for": "1h"}
    first = (await api.post("/enqueue", json=enqueue_body(1, unique))).json()
    task = (await api.get(f"/tasks/{first['id']}")).json()
    assert task["unique"]["until"] is not None and task["unique"]["held"]
    assert (await api.post("/enqueue", json=enqueue_body(1, unique))).status_code == 200
    # The hour has passed (moved back rather than waited for).
    await db.execute(
        "UPDATE taskq.tasks SET unique_until = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(first["id"]),
    )
    assert (await api.get(f"/tasks/{first['id']}")).json()["unique"]["held"] is False
    results = await asyncio.gather(
        *(api.post("/enqueue", json=enqueue_body(1, unique)) for _ in range(10))
    )
    assert sorted(r.status_code for r in results) == [200] * 9 + [201]
    old = (await api.get(f"/tasks/{first['id']}")).json()
    assert old["status"] == "ENQUEUED" and old["unique"]["key"] is None  # released; runs on
    assert await count(db) == 2


async def test_replace_moves_the_queued_task_and_republishes_when_earlier(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    unique = {"key": "$.user", "while": "queued", "on_conflict": "replace"}
    first = await api.post("/enqueue", json=enqueue_body(1, unique, delay=600))
    task_id = first.json()["id"]
    ident = uuid.UUID(task_id)
    generation = await db.fetchval("SELECT generation FROM taskq.tasks WHERE id = $1", ident)

    body = {**enqueue_body(1, unique, delay=1200), "payload": {"user": 1, "n": 2}}
    later = await api.post("/enqueue", json=body)
    assert later.status_code == 200 and later.headers["unique-duplicate"] == "replaced"
    assert later.json()["id"] == task_id and later.json()["replaced"] is True
    assert later.json()["run_at"] > first.json()["run_at"]
    row = await db.fetchrow(
        "SELECT payload::text, generation FROM taskq.tasks WHERE id = $1", ident
    )
    assert json.loads(row["payload"]) == {"user": 1, "n": 2}
    assert row["generation"] == generation  # later: the envelope in the broker will do

    now = {**enqueue_body(1, unique), "payload": {"user": 1, "n": 3}}
    earlier = await api.post("/enqueue", json=now)
    assert earlier.headers["unique-duplicate"] == "replaced"
    row = await db.fetchrow(
        "SELECT payload::text, generation FROM taskq.tasks WHERE id = $1", ident
    )
    assert json.loads(row["payload"])["n"] == 3 and row["generation"] == generation + 1
    # Due now: published again at once (the first envelope is still in the delay levels).
    [message] = await drain(settings, "default", expect=1)
    assert message.message_id == task_id
    assert await count(db) == 1

    # Once started, a queued-only key is free: the next enqueue creates.
    await set_state(db, task_id, "RUNNING")
    assert (await api.post("/enqueue", json=now)).status_code == 201


async def test_replace_keeps_a_holder_that_started(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    unique = {"key": "$.user", "while": "active", "on_conflict": "replace"}
    first = (await api.post("/enqueue", json=enqueue_body(1, unique))).json()
    await set_state(db, first["id"], "RUNNING")
    body = {**enqueue_body(1, unique), "payload": {"user": 1, "n": 2}}
    kept = await api.post("/enqueue", json=body)
    assert kept.status_code == 200 and kept.headers["unique-duplicate"] == "kept"
    assert kept.json()["status"] == "RUNNING" and kept.json()["replaced"] is False
    payload = await db.fetchval("SELECT payload::text FROM taskq.tasks")
    assert json.loads(payload) == {"user": 1}


async def test_replace_from_many_concurrent_enqueues_leaves_one_row(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    unique = {"key": "$.user", "while": "queued", "on_conflict": "replace"}
    bodies = [
        {**enqueue_body(1, unique, delay=60), "payload": {"user": 1, "n": n}} for n in range(50)
    ]
    responses = await asyncio.gather(*(api.post("/enqueue", json=b) for b in bodies))
    assert sorted(r.status_code for r in responses) == [200] * 49 + [201]
    assert await count(db) == 1


@pytest.mark.parametrize("mode", sorted(HOLDS))
async def test_a_task_parked_by_a_paused_type_holds_its_key(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings, mode: str
) -> None:
    # WAITING has not run: for its key it is still queued, in every mode.
    unique = {"key": "$.user", "while": mode}
    async with harness(settings) as h:
        assert await h.store.pause_type("demo.echo", True) is not None
        first = await api.post("/enqueue", json=enqueue_body(1, unique))
        assert first.status_code == 201, first.text
        task_id = uuid.UUID(first.json()["id"])
        [parked] = await h.store.claim([task_id], "w", 30.0)
        assert parked.decision == "parked"
        task = (await api.get(f"/tasks/{task_id}")).json()
        assert (task["status"], task["wait_reason"]) == ("WAITING", "paused")
        assert task["unique"]["held"] is True
        again = await api.post("/enqueue", json=enqueue_body(1, unique))
        assert again.status_code == 200 and again.headers["unique-duplicate"] == "kept"
        assert again.json()["id"] == str(task_id) and again.json()["status"] == "WAITING"
        assert await count(db) == 1
        # Released by the resume: ENQUEUED, never started, the holder still.
        assert await h.store.pause_type("demo.echo", False) is not None
        assert (await h.task(task_id)).status == "ENQUEUED"
        assert (await api.post("/enqueue", json=enqueue_body(1, unique))).status_code == 200
        assert await count(db) == 1


async def test_a_task_parked_by_a_concurrency_limit_holds_its_key_and_debounces(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    await put_type(api, "demo.limited", concurrency={"key": "user", "limit": 1})
    unique = {"key": "$.n"}
    debounce = {**unique, "on_conflict": "replace"}
    async with harness(settings) as h:
        busy = await api.post("/enqueue", json={"type": "demo.limited", "payload": {"user": 1}})
        busy_id = uuid.UUID(busy.json()["id"])
        [running] = await h.store.claim([busy_id], "w", 30.0)
        assert isinstance(running, ClaimedTask)
        body = {"type": "demo.limited", "payload": {"user": 1, "n": 1}, "unique": unique}
        first = await api.post("/enqueue", json=body)
        assert first.status_code == 201, first.text
        task_id = uuid.UUID(first.json()["id"])
        [parked] = await h.store.claim([task_id], "w", 30.0)
        assert parked.decision == "parked"
        assert (await h.task(task_id)).wait_reason == "concurrency"

        again = await api.post("/enqueue", json=body)
        assert again.status_code == 200 and again.headers["unique-duplicate"] == "kept"
        assert again.json()["id"] == str(task_id) and again.json()["status"] == "WAITING"
        # Debounce: the WAITING holder takes the payload and run_at, and waits on,
        # owing no publish (it has no envelope; its release owes one).
        generation = await db.fetchval("SELECT generation FROM taskq.tasks WHERE id = $1", task_id)
        moved = {**body, "payload": {"user": 1, "n": 1, "v": 2}, "unique": debounce, "delay": 600}
        replaced = await api.post("/enqueue", json=moved)
        assert replaced.status_code == 200 and replaced.headers["unique-duplicate"] == "replaced"
        assert replaced.json()["id"] == str(task_id) and replaced.json()["status"] == "WAITING"
        row = await db.fetchrow(
            "SELECT status, payload::text, generation, published_at IS NOT NULL AS published,"
            " run_at > now() + interval '5 minutes' AS later FROM taskq.tasks WHERE id = $1",
            task_id,
        )
        assert row["status"] == "WAITING" and row["published"] and row["later"]
        assert json.loads(row["payload"]) == {"user": 1, "n": 1, "v": 2}
        assert row["generation"] == generation
        assert await h.store.owed_among([task_id]) == []
        earlier = await api.post("/enqueue", json={**moved, "delay": 0})
        assert earlier.headers["unique-duplicate"] == "replaced"
        assert await h.store.owed_among([task_id]) == []
        assert await count(db) == 2

        # The slot frees: released ENQUEUED with its publish owed, the holder still.
        await h.store.complete([(busy_id, running.claim_token, "null")], holds_slots=True)
        assert (await h.task(task_id)).status == "ENQUEUED"
        [owed] = await h.store.owed_among([task_id])
        assert owed.id == task_id
        assert (await api.post("/enqueue", json=body)).json()["id"] == str(task_id)
        assert await count(db) == 2


async def test_a_debounce_that_moves_a_parked_task_to_another_key_lets_it_claim_again(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    # Parked for user 1's slot, then debounced with user 2's payload: it must not
    # wait for user 1's slot, which has nothing to do with it now.
    await put_type(api, "demo.limited", concurrency={"key": "user", "limit": 1})
    debounce = {"key": "$.n", "on_conflict": "replace"}
    async with harness(settings) as h:
        busy = await api.post("/enqueue", json={"type": "demo.limited", "payload": {"user": 1}})
        busy_id = uuid.UUID(busy.json()["id"])
        [running] = await h.store.claim([busy_id], "w", 30.0)
        assert isinstance(running, ClaimedTask)
        body = {"type": "demo.limited", "payload": {"user": 1, "n": 1}, "unique": debounce}
        task_id = uuid.UUID((await api.post("/enqueue", json=body)).json()["id"])
        [parked] = await h.store.claim([task_id], "w", 30.0)
        assert parked.decision == "parked"
        generation = await db.fetchval("SELECT generation FROM taskq.tasks WHERE id = $1", task_id)

        # The same key: it waits on, owing nothing.
        same = await api.post("/enqueue", json={**body, "payload": {"user": 1, "n": 1, "v": 2}})
        assert same.headers["unique-duplicate"] == "replaced"
        assert same.json()["status"] == "WAITING"
        assert await h.store.owed_among([task_id]) == []

        moved = await api.post("/enqueue", json={**body, "payload": {"user": 2, "n": 1}})
        assert moved.status_code == 200 and moved.headers["unique-duplicate"] == "replaced"
        assert moved.json()["id"] == str(task_id) and moved.json()["status"] == "ENQUEUED"
        row = await db.fetchrow(
            "SELECT status, wait_reason, concurrency_key, generation FROM taskq.tasks"
            " WHERE id = $1",
            task_id,
        )
        assert tuple(row.values())[:3] == ("ENQUEUED", None, None)
        assert row["generation"] == generation + 1
        [owed] = await h.store.owed_among([task_id])
        assert owed.id == task_id and owed.generation == generation + 1
        # Its claim decides under the new key, whose slot is free; user 1's stays taken.
        [claimed] = await h.store.claim([task_id], "w", 30.0)
        assert isinstance(claimed, ClaimedTask) and claimed.concurrency_key == "2"
        slots = dict(
            await db.fetch(
                "SELECT key, running FROM taskq.concurrency_slots WHERE type = 'demo.limited'"
            )
        )
        assert slots == {"1": 1, "2": 1}


async def test_idempotency_keys_compose_with_unique(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    request = enqueue_body(1, idempotency_key="order-1")
    first = await api.post("/enqueue", json=request)
    replay = await api.post("/enqueue", json=request)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    # Another key, the same unique key: a duplicate, not a conflict.
    other = await api.post("/enqueue", json=enqueue_body(1, idempotency_key="order-2"))
    assert other.status_code == 200 and other.headers["unique-duplicate"] == "kept"
    assert other.json()["id"] == first.json()["id"]
    # The same idempotency key with another request: still the 409.
    conflict = await api.post("/enqueue", json=enqueue_body(2, idempotency_key="order-1"))
    assert_problem(conflict, 409, "idempotency_key")
    assert await count(db) == 1


async def test_the_types_unique_applies_and_a_missing_path_is_a_400(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await put_type(api, "demo.keyed", unique={"key": "$.customer.id", "while": "queued"})
    shown = (await api.get("/types/demo.keyed")).json()["unique"]
    assert shown == {"key": "$.customer.id", "while": "queued", "for": None, "on_conflict": "keep"}
    body = {"type": "demo.keyed", "payload": {"customer": {"id": 5}}}
    assert (await api.post("/enqueue", json=body)).status_code == 201
    assert (await api.post("/enqueue", json=body)).status_code == 200
    missing = await api.post("/enqueue", json={"type": "demo.keyed", "payload": {"customer": 5}})
    problem = assert_problem(missing, 400, "payload")
    assert "$.customer.id" in problem["detail"]
    # An enqueue's own unique wins over the type's.
    own = {**body, "unique": {"key": "one-off"}}
    assert (await api.post("/enqueue", json=own)).status_code == 201
    assert await count(db) == 2
    bad = await api.put("/types/demo.keyed", json={"unique": {"while": "sometimes"}})
    assert_problem(bad, 400, "unique.while")


USER_1 = ("demo.echo", {"user": 1})
USER_2 = ("demo.echo", {"user": 2})


async def wait_for_lock_wait(db: asyncpg.Connection, sessions: int = 1) -> None:
    """Until ``sessions`` sessions of this database wait for a lock (generous deadline)."""
    for _ in range(600):
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= sessions:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sessions} sessions did not wait for a lock within 30 s")


async def test_batches_of_the_same_keys_in_opposite_orders_do_not_deadlock(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    users = [{"user": n} for n in range(1, 10)]
    async with Client.connect(settings) as client:
        caller = await asyncpg.connect(settings.database_url)
        try:
            # A caller's open transaction holds the middle key: both batches insert up
            # to it and wait there, one from each end.
            async with caller.transaction():
                await client.enqueue("demo.echo", users[4], unique=BY_USER, connection=caller)
                forth = asyncio.ensure_future(
                    client.enqueue_many("demo.echo", users, unique=BY_USER)
                )
                back = asyncio.ensure_future(
                    client.enqueue_many("demo.echo", users[::-1], unique=BY_USER)
                )
                await wait_for_lock_wait(db, 2)
            results = await asyncio.gather(forth, back)
        finally:
            await caller.close()
    assert sum(r.created for batch in results for r in batch) == 8
    assert await count(db) == 9


async def test_in_a_callers_transaction(settings: Settings, db: asyncpg.Connection) -> None:
    await declare_topology(settings)
    async with running_api(settings) as api:
        await put_type(api, "demo.echo")
    async with Client.connect(settings) as client:
        caller = await asyncpg.connect(settings.database_url)
        try:
            async with caller.transaction():
                first = await client.enqueue(*USER_1, unique=BY_USER, connection=caller)
                second = await client.enqueue(*USER_1, unique=BY_USER, connection=caller)
                assert first.created and second.duplicate and second.id == first.id
                # Another session's enqueue of the key waits for this transaction.
                waiting = asyncio.ensure_future(client.enqueue(*USER_1, unique=BY_USER))
                await wait_for_lock_wait(db)
                assert not waiting.done()
            outside = await waiting
            assert outside.duplicate and outside.id == first.id
            # A rolled-back transaction leaves the key free.
            transaction = caller.transaction()
            await transaction.start()
            rolled = await client.enqueue(*USER_2, unique=BY_USER, connection=caller)
            waiting = asyncio.ensure_future(client.enqueue(*USER_2, unique=BY_USER))
            await wait_for_lock_wait(db)
            await transaction.rollback()
            again = await waiting
            assert again.created and again.id != rolled.id
        finally:
            await caller.close()
    assert await count(db) == 2


async def test_an_operators_retry_runs_the_task_outside_its_uniqueness(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = (await api.post("/enqueue", json=enqueue_body(1))).json()
    await set_state(db, first["id"], "FAILED")
    second = await api.post("/enqueue", json=enqueue_body(1))
    assert second.status_code == 201  # FAILED freed the key
    retried = await api.post(f"/tasks/{first['id']}/retry", json={})
    assert retried.status_code == 200, retried.text
    task = (await api.get(f"/tasks/{first['id']}")).json()
    assert task["status"] == "ENQUEUED" and task["unique"]["key"] is None
    assert (await api.post("/enqueue", json=enqueue_body(1))).json()["id"] == second.json()["id"]


async def test_a_worker_registers_the_types_unique_and_runs_a_debounced_task_once(
    settings: Settings,
) -> None:
    handlers = Registry()
    seen: list[dict[str, Any]] = []

    @handlers.task(
        "doc.reindex.v1",
        unique={"key": "$.doc", "while": "queued", "on_conflict": "replace"},
    )
    async def reindex(payload: dict[str, Any], ctx: Context) -> None:
        seen.append(payload)

    async with harness(settings) as h, running_worker(settings, handlers):
        [record] = [t for t in await h.store.task_types() if t.name == "doc.reindex.v1"]
        assert record.unique_spec is not None
        assert json.loads(record.unique_spec)["on_conflict"] == "replace"
        async with Client.connect(settings) as client:
            # Five edits within the debounce window: one task, moved each time, that
            # runs once with the last edit (its envelope comes early and goes back).
            results = [
                await reindex.enqueue(client, {"doc": 1, "version": n}, delay=3) for n in range(5)
            ]
            assert results[0].created and all(r.replaced for r in results[1:])
            assert len({r.id for r in results}) == 1
            await h.wait_for(results[0].id, "SUCCEEDED", timeout=60)
            assert seen == [{"doc": 1, "version": 4}]
            # Started (and finished): the key is free again.
            after = await reindex.enqueue(client, {"doc": 1, "version": 5})
            assert after.created
            await h.wait_for(after.id, "SUCCEEDED", timeout=60)
    assert seen[1:] == [{"doc": 1, "version": 5}]


async def test_a_sync_client_in_a_psycopg_transaction(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    def work() -> tuple[EnqueueResult, ...]:
        with SyncClient(settings) as client, psycopg.connect(settings.database_url) as conn:
            with conn.transaction():
                first = client.enqueue(*USER_1, unique=BY_USER, connection=conn)
                # A batch, under a savepoint in the caller's transaction.
                inner = client.enqueue_many(
                    "demo.echo", [{"user": 1}, {"user": 3}], unique=BY_USER, connection=conn
                )
            # Django's autocommit connection outside atomic(): a statement of its own.
            conn.autocommit = True
            outside = client.enqueue(*USER_1, unique=BY_USER, connection=conn)
            return first, *inner, outside

    first, duplicate, other, outside = await asyncio.to_thread(work)
    assert first.created and other.created
    assert duplicate.duplicate and duplicate.id == first.id
    assert outside.duplicate and outside.id == first.id
    assert await count(db) == 2
