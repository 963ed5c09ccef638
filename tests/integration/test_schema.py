"""The schema: event triggers, named constraints, every query block prepares."""

from __future__ import annotations

import dataclasses
import re
import uuid

import asyncpg
import pytest

from taskq import model, sql

pytestmark = pytest.mark.integration


async def add_type(db: asyncpg.Connection, name: str = "demo.noop") -> None:
    await db.execute("INSERT INTO task_type (name, queue) VALUES ($1, 'default')", name)


async def add_task(db: asyncpg.Connection, **values: object) -> uuid.UUID:
    task_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds)"
        " VALUES ($1, 'demo.noop', 'default', '{}', $2, 30)",
        task_id,
        values.get("max_attempts", 3),
    )
    return task_id


async def events(db: asyncpg.Connection, task_id: uuid.UUID) -> list[tuple[object, ...]]:
    rows = await db.fetch(
        "SELECT status, previous_status, attempt, error, worker_id, run_at IS NOT NULL AS due"
        " FROM task_events WHERE task_id = $1 ORDER BY id",
        task_id,
    )
    return [tuple(row) for row in rows]


async def test_every_query_block_prepares(db: asyncpg.Connection) -> None:
    # With nothing on the search_path, a name the block does not qualify fails.
    await db.execute("SET search_path = ''")
    for name, text in sql.queries().items():
        try:
            await db.prepare(text)
        except asyncpg.PostgresError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"query {name!r} does not prepare: {exc}")


def _fields(record: type, *also: str, without: tuple[str, ...] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(record) if f.name not in without] + list(also)


# Read by task_get alone (GET /tasks/{id}), not by the listings.
_DETAIL_ONLY = (
    "publish_error",
    "publish_retry_at",
    "limited_by",
    "limited_until",
    "workflow_id",
)
_CONCURRENCY = ("concurrency_limit", "concurrency_key", "concurrency_source")
# The columns each query returns, in order, as the record built from its rows reads them.
RECORD_COLUMNS = {
    "claim": list(model.COLUMNS["claim"]),
    "claim_gated": list(model.COLUMNS["claim"]),
    **{name: list(model.COLUMNS["owed"]) for name in model.OWED_QUERIES},
    "task_get": _fields(
        model.TaskRecord,
        "progress_details",
        "progress_attempt",
        "progress_at",
        *(f"unique_{name.rstrip('_')}" for name in _fields(model.UniqueHold)),
        without=("unique",),
    ),
    "tasks_list": _fields(model.TaskRecord, without=(*_DETAIL_ONLY, "progress", "unique")),
    "dlq_list": _fields(model.TaskRecord, without=(*_DETAIL_ONLY, "progress", "unique")),
    "progress_since": [
        "seq",
        "task_id",
        "type",
        "queue",
        "attempt",
        "fraction",
        "details",
        "updated_at",
    ],
    "task_events": _fields(model.TaskEvent),
    "events_since": _fields(model.StreamEvent),
    # A type's concurrency limit is read from three columns.
    "types_all": _fields(model.TaskTypeRecord, *_CONCURRENCY, without=("concurrency",)),
    "limiters_list": _fields(model.LimiterRecord),
    "type_put": _fields(model.TaskTypeRecord, *_CONCURRENCY, "created", without=("concurrency",)),
    "type_pause": _fields(model.TaskTypeRecord, *_CONCURRENCY, without=("concurrency",)),
    "workers_list": _fields(model.WorkerRecord),
    "set_aside": _fields(model.SetAside),
    "purges_unfinished": _fields(model.Purge),
    "stats_window": _fields(model.Throughput),
}


@pytest.mark.parametrize("name", sorted(RECORD_COLUMNS))
async def test_each_record_reads_the_columns_its_query_returns(
    db: asyncpg.Connection, name: str
) -> None:
    statement = await db.prepare(sql.queries()[name])
    assert [a.name for a in statement.get_attributes()] == RECORD_COLUMNS[name]


@pytest.mark.parametrize("constraint", ["tasks_status_valid", "task_events_status_valid"])
async def test_the_status_enum_is_the_schemas(db: asyncpg.Connection, constraint: str) -> None:
    definition = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1", constraint
    )
    assert sorted(re.findall(r"'([A-Z]+)'", definition)) == sorted(model.STATUS_NAMES)


async def test_events_follow_the_lifecycle(db: asyncpg.Connection) -> None:
    await add_type(db)
    task_id = await add_task(db)

    claim = (
        "UPDATE tasks SET status = 'RUNNING', attempts = attempts + 1, worker_id = $2,"
        " lease_expires_at = now() + interval '30 seconds', started_at = now() WHERE id = $1"
    )
    await db.execute(claim, task_id, "w1")
    await db.execute(
        "UPDATE tasks SET status = 'ENQUEUED', last_error = 'boom', worker_id = NULL,"
        " lease_expires_at = NULL, run_at = now() + interval '5 seconds' WHERE id = $1",
        task_id,
    )
    await db.execute(claim, task_id, "w2")
    # A heartbeat changes no status and writes no event.
    await db.execute(
        "UPDATE tasks SET lease_expires_at = now() + interval '60 seconds' WHERE id = $1", task_id
    )
    await db.execute(
        "UPDATE tasks SET status = 'SUCCEEDED', result = '{}', finished_at = now() WHERE id = $1",
        task_id,
    )

    assert await events(db, task_id) == [
        ("ENQUEUED", None, 0, None, None, True),
        ("RUNNING", "ENQUEUED", 1, None, "w1", False),
        ("ENQUEUED", "RUNNING", 1, "boom", "w1", True),
        ("RUNNING", "ENQUEUED", 2, None, "w2", False),
        ("SUCCEEDED", "RUNNING", 2, None, "w2", False),
    ]


async def test_failure_and_lease_takeover_record_the_error(db: asyncpg.Connection) -> None:
    await add_type(db)
    task_id = await add_task(db)
    await db.execute(
        "UPDATE tasks SET status = 'RUNNING', attempts = 1, worker_id = 'w1',"
        " lease_expires_at = now() WHERE id = $1",
        task_id,
    )
    # Another worker takes over the expired claim: same status, new attempt.
    await db.execute(
        "UPDATE tasks SET attempts = 2, worker_id = 'w2', last_error = 'lease expired',"
        " lease_expires_at = now() + interval '30 seconds' WHERE id = $1",
        task_id,
    )
    await db.execute(
        "UPDATE tasks SET status = 'FAILED', last_error = 'fatal', finished_at = now(),"
        " lease_expires_at = NULL WHERE id = $1",
        task_id,
    )
    assert await events(db, task_id) == [
        ("ENQUEUED", None, 0, None, None, True),
        ("RUNNING", "ENQUEUED", 1, None, "w1", False),
        ("RUNNING", "RUNNING", 2, "lease expired", "w2", False),
        ("FAILED", "RUNNING", 2, "fatal", "w2", False),
    ]


async def test_batch_statements_write_one_event_per_row(db: asyncpg.Connection) -> None:
    await add_type(db)
    ids = [uuid.uuid4() for _ in range(200)]
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds)"
        " SELECT id, 'demo.noop', 'default', '{}', 3, 30 FROM unnest($1::uuid[]) AS id",
        ids,
    )
    await db.execute(
        "UPDATE tasks SET status = 'CANCELLED', finished_at = now() WHERE id = ANY($1)", ids[:50]
    )
    counts = await db.fetch(
        "SELECT status, count(*) AS n FROM task_events GROUP BY status ORDER BY status"
    )
    assert {row["status"]: row["n"] for row in counts} == {"CANCELLED": 50, "ENQUEUED": 200}


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("UPDATE tasks SET status = 'DONE'", "tasks_status_valid"),
        ("UPDATE tasks SET attempts = 4", "tasks_attempts_range"),
        ("UPDATE tasks SET max_attempts = 0", "tasks_max_attempts_range"),
        ("UPDATE tasks SET payload = '[1]'", "tasks_payload_object"),
        ("UPDATE tasks SET status = 'RUNNING'", "tasks_running_has_lease"),
        ("UPDATE tasks SET status = 'SUCCEEDED'", "tasks_terminal_has_finished_at"),
        ("UPDATE tasks SET idempotency_key = ''", "tasks_idempotency_key_length"),
        ("UPDATE tasks SET queue = 'Bad Queue'", "tasks_queue_format"),
        ("UPDATE task_type SET max_attempts = 101", "task_type_max_attempts_range"),
        ("UPDATE task_type SET name = 'bad name'", "task_type_name_format"),
    ],
)
async def test_named_constraints(db: asyncpg.Connection, statement: str, constraint: str) -> None:
    await add_type(db)
    await add_task(db)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await db.execute(statement)
    assert caught.value.constraint_name == constraint


async def test_idempotency_key_is_unique(db: asyncpg.Connection) -> None:
    await add_type(db)
    first, second = await add_task(db), await add_task(db)
    await db.execute("UPDATE tasks SET idempotency_key = 'k' WHERE id = $1", first)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("UPDATE tasks SET idempotency_key = 'k' WHERE id = $1", second)
