"""taskq's Postgres objects live in a schema of their own (TASKQ_DB_SCHEMA).

A fresh install creates nothing in ``public``; an install made before the schema
(migrations 0001-0006 into ``public``) moves into it with its tasks; another
schema works end to end, also for an enqueue on the application's own
connection, whose search_path names neither; two schemas in one database keep
their tasks apart.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from taskq import sql
from taskq.client import Client
from taskq.migrate import ensure_database, migrate
from taskq.settings import Settings
from taskq.store import NewTask, Store
from tests.support.services import delete_namespace, make_settings
from tests.support.worker_fixtures import harness, running_worker

# What an install holds in its schema besides indexes, row types and sequences.
TABLES = [
    "concurrency_slots",
    "history_partitions",
    "queue_pauses",
    "queue_purges",
    "rate_limit_buckets",
    "rate_limiters",
    "schedules",
    "task_events_before",
    "task_events_default",
    "task_progress",
    "task_type",
    "taskq_migrations",
    "tasks",
    "workers",
    "workflow_edges",
    "workflow_missed",
    "workflow_nodes",
    "workflows",
]
FUNCTIONS = [
    "history_create",
    "history_drop",
    "taskq_events_on_insert",
    "taskq_events_on_update",
    "taskq_notify_finished",
    "taskq_workflows_on_update",
]
# Every migration, as `taskq migrate` reports it applied.
LABELS = [f"{m.version:04d}_{m.name}" for m in sql.migrations()]


# ---------------------------------------------------------------- installs


async def objects(connection: asyncpg.Connection, schema: str) -> dict[str, list[str]]:
    """Tables, functions, types and sequences in ``schema``, by kind."""
    rows = await connection.fetch(
        "SELECT 'relation ' || c.relkind::text AS kind, c.relname AS name FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1"
        " UNION ALL SELECT 'function', p.proname FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1"
        " UNION ALL SELECT 'type ' || t.typtype::text, t.typname FROM pg_type t"
        " JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = $1"
        " ORDER BY 1, 2",
        schema,
    )
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["kind"], []).append(row["name"])
    return found


async def function_settings(connection: asyncpg.Connection, schema: str) -> list[list[str]]:
    rows = await connection.fetch(
        "SELECT p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = $1 ORDER BY p.proname",
        schema,
    )
    return [sorted(row["proconfig"]) for row in rows]


async def test_a_fresh_install_creates_nothing_in_public(empty_database_url: str) -> None:
    report = await migrate(empty_database_url)
    assert report.applied == LABELS
    connection = await asyncpg.connect(empty_database_url)
    try:
        assert await objects(connection, "public") == {}
        installed = await objects(connection, "taskq")
        # The history's partitions after the old table are named by their start.
        dated = re.compile(r"task_events_\d{8}t\d{6}")
        assert [t for t in installed["relation r"] if not dated.fullmatch(t)] == TABLES
        assert installed["relation p"] == ["task_events"]  # partitioned (0021)
        assert installed["function"] == FUNCTIONS
        assert installed["type d"] == ["taskq_queue_name"]
        assert installed["relation S"] == [
            "queue_purges_id_seq",
            "task_events_before_id_seq",
            "task_events_id_seq",
            "task_progress_seq",
        ]
        # The triggers resolve task_events whatever the caller's search_path.
        assert await function_settings(connection, "taskq") == [
            ["search_path=taskq, pg_temp"],
            ["search_path=taskq, pg_temp"],
            ["search_path=taskq, pg_temp"],
            ["enable_nestloop=off", "search_path=taskq, pg_temp"],
            ["search_path=taskq, pg_temp"],
            ["search_path=taskq, pg_temp"],
        ]
    finally:
        await connection.close()


async def install_the_old_way(url: str) -> None:
    """What ``taskq migrate`` did before 0007: files 0001-0006, unqualified, into
    the schema the connection's search_path names first (``public``), recorded
    in a ``taskq_migrations`` there."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS taskq_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        record = "INSERT INTO taskq_migrations (version, name, checksum) VALUES ($1, $2, $3)"
        for migration in sql.migrations()[:6]:
            checksum = hashlib.sha256(migration.sql.encode()).hexdigest()
            if migration.transactional:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(record, migration.version, migration.name, checksum)
            else:
                for statement in migration.statements():
                    await connection.execute(statement)
                await connection.execute(record, migration.version, migration.name, checksum)
    finally:
        await connection.close()


@pytest.fixture
async def empty_settings(
    empty_database_url: str, amqp_url: str, namespace: str
) -> AsyncIterator[Settings]:
    """Settings for a database that does not exist yet and a namespace of the test's own."""
    value = make_settings(
        database_url=empty_database_url, amqp_url=amqp_url, namespace=namespace, max_delay="1h"
    )
    yield value
    await delete_namespace(value)


async def test_an_install_made_before_the_schema_moves_into_it_with_its_tasks(
    empty_database_url: str, empty_settings: Settings
) -> None:
    await ensure_database(empty_database_url)
    await install_the_old_way(empty_database_url)
    old = await asyncpg.connect(empty_database_url)
    try:
        await old.execute("INSERT INTO task_type (name, queue) VALUES ('demo.echo', 'default')")
        ids = sorted(uuid.uuid4() for _ in range(3))
        # Enqueued, their publishes owed: the relay publishes them after the move.
        await old.execute(
            "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds)"
            " SELECT id, 'demo.echo', 'default', json_build_object('n', n)::jsonb, 3, 30"
            " FROM unnest($1::uuid[]) WITH ORDINALITY AS r(id, n)",
            ids,
        )
        before = await old.fetch("SELECT * FROM tasks ORDER BY id")
        events_before = await old.fetch("SELECT * FROM task_events ORDER BY id")
        checksums = await old.fetch("SELECT version, checksum FROM taskq_migrations ORDER BY 1")

        report = await migrate(empty_database_url)
        assert report.applied == LABELS[LABELS.index("0007_own_schema") :]

        assert await objects(old, "public") == {}
        after = await old.fetch("SELECT * FROM taskq.tasks ORDER BY id")
        # Columns that later migrations add are not compared.
        columns = list(dict(before[0]))  # (iterating a Record yields its values)
        assert [{k: row[k] for k in columns} for row in after] == [dict(r) for r in before]
        assert await old.fetch("SELECT * FROM taskq.task_events ORDER BY id") == events_before
        moved = await old.fetch("SELECT version, checksum FROM taskq.taskq_migrations ORDER BY 1")
        assert moved[:6] == checksums
        assert [row["version"] for row in moved] == [m.version for m in sql.migrations()]
        assert (await migrate(empty_database_url)).applied == []

        # It works: a worker runs the moved tasks (the relay publishes what they
        # are owed) and a new one; their events land in the moved history.
        async with harness(empty_settings) as h, running_worker(empty_settings):
            new = await Client.connect(empty_settings)
            try:
                result = await new.enqueue("demo.echo", {"n": 4})
            finally:
                await new.close()
            for task_id in [*ids, uuid.UUID(str(result.id))]:
                await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        row = await old.fetchrow("SELECT result FROM taskq.tasks WHERE id = $1", ids[0])
        assert row is not None and json.loads(row["result"]) == {"n": 1}
        assert (
            await old.fetchval("SELECT count(*) FROM taskq.task_events WHERE status = 'SUCCEEDED'")
            == 4
        )
    finally:
        await old.close()


async def test_a_schema_of_its_own_works_end_to_end(empty_settings: Settings) -> None:
    settings = empty_settings.model_copy(update={"db_schema": "jobs"})
    await migrate(settings.database_url, schema="jobs")
    # The application's connection: its search_path names neither schema.
    app = await asyncpg.connect(settings.database_url, server_settings={"search_path": "public"})
    try:
        await app.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text)")  # its own
        async with harness(settings) as h, running_worker(settings):
            client = await Client.connect(settings)
            try:
                plain = await client.enqueue("demo.echo", {"via": "pool"})
                async with app.transaction():
                    await app.execute("INSERT INTO tasks (title) VALUES ('write the report')")
                    joined = await client.enqueue("demo.echo", {"via": "app"}, connection=app)
                ids = [uuid.UUID(str(r.id)) for r in (plain, joined)]
                for task_id in ids:
                    await h.wait_for(task_id, "SUCCEEDED", timeout=30)
            finally:
                await client.close()
        assert await app.fetchval("SELECT count(*) FROM tasks") == 1  # the application's
        assert await app.fetchval("SELECT count(*) FROM jobs.tasks") == 2
        events = await app.fetch(
            "SELECT status FROM jobs.task_events WHERE task_id = $1 ORDER BY id", ids[1]
        )
        assert [e["status"] for e in events] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
        assert not await app.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'taskq'")
        public = await objects(app, "public")
        assert public["relation r"] == ["tasks"] and "function" not in public
    finally:
        await app.close()


async def test_two_schemas_in_one_database_keep_their_tasks_apart(database_url: str) -> None:
    await migrate(database_url, schema="other")
    connection = await asyncpg.connect(database_url)
    try:
        # Every block names the other schema's objects, with nothing on the search_path.
        await connection.execute("SET search_path = ''")
        for text in sql.queries("other").values():
            await connection.prepare(text)
    finally:
        await connection.close()
    first = await Store.connect(database_url)
    second = await Store.connect(database_url, schema="other")
    try:
        for store in (first, second):
            await store.register_task_types([("demo.echo", "default", 3, 30.0, None)])
        task_id = uuid.uuid4()
        [created] = await first.enqueue([NewTask(task_id, "demo.echo", "{}")])
        assert created.outcome == "created"
        assert await first.task(task_id) is not None
        assert await second.task(task_id) is None
        assert await second.unpublished_count() == 0 and await first.unpublished_count() == 1
        assert first.notify_channel == "taskq_enqueued"
        assert second.notify_channel == "other_enqueued"
    finally:
        await first.close()
        await second.close()
