"""`taskq migrate`: creates the database, applies once, safe twice and concurrently."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg
import pytest

from taskq import sql
from taskq.errors import MigrationError
from taskq.migrate import migrate
from tests.support.services import subprocess_env

pytestmark = pytest.mark.integration


async def run_migrate(url: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskq",
        "migrate",
        env=subprocess_env(TASKQ_DATABASE_URL=url),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def applied_versions(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT version FROM taskq.taskq_migrations ORDER BY version")
    finally:
        await connection.close()
    return [row["version"] for row in rows]


async def test_migrate_twice_applies_once(empty_database_url: str, tmp_path: Path) -> None:
    code, out, err = await run_migrate(empty_database_url, tmp_path)
    assert code == 0, err
    assert "created the database" in out
    assert "applied 0001_initial" in out

    code, out, err = await run_migrate(empty_database_url, tmp_path)
    assert code == 0, err
    assert "applied" not in out.replace("nothing to apply", "")
    assert "nothing to apply" in out
    assert await applied_versions(empty_database_url) == [m.version for m in sql.migrations()]


async def test_concurrent_migrations_apply_once(empty_database_url: str, tmp_path: Path) -> None:
    results = await asyncio.gather(*(run_migrate(empty_database_url, tmp_path) for _ in range(3)))
    assert [code for code, _, _ in results] == [0, 0, 0], results
    outputs = "".join(out for _, out, _ in results)
    assert outputs.count("applied 0001_initial") == 1
    assert await applied_versions(empty_database_url) == [m.version for m in sql.migrations()]


async def test_edited_migration_is_refused(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("UPDATE taskq_migrations SET checksum = 'x' WHERE version = 1")
    finally:
        await connection.close()
    with pytest.raises(MigrationError, match="0001_initial was edited"):
        await migrate(database_url)


async def test_unreachable_database_is_a_one_line_error(tmp_path: Path) -> None:
    code, _, err = await run_migrate("postgresql://postgres@127.0.0.1:1/taskq", tmp_path)
    assert code == 1
    assert err.startswith("taskq: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


# ---------------------------------------------------------------- locks and concurrent indexes


def with_migration(monkeypatch: pytest.MonkeyPatch, version: int, name: str, text: str) -> None:
    """Add a migration after the real ones."""
    extra = sql.Migration(version, name, text)
    real = sql.migrations()
    monkeypatch.setattr(sql, "migrations", lambda: [*real, extra])


async def column_exists(db: asyncpg.Connection, name: str) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'tasks' AND column_name = $1",
            name,
        )
    )


async def test_a_migration_that_cannot_get_its_lock_fails_clearly_and_changes_nothing(
    database_url: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_migration(monkeypatch, 9001, "add_column", "ALTER TABLE tasks ADD COLUMN extra int;")
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE tasks IN ACCESS SHARE MODE")  # a long reader
            started = asyncio.get_running_loop().time()
            with pytest.raises(MigrationError) as caught:
                await migrate(database_url, lock_timeout=0.2, lock_tries=3, retry_wait=0.1)
            took = asyncio.get_running_loop().time() - started
    finally:
        await holder.close()
    message = str(caught.value)
    assert "9001_add_column could not get its locks within 0.2s, 3 times" in message
    assert "nothing of it was applied" in message and "run taskq migrate again" in message.lower()
    assert took < 30
    assert not await column_exists(db, "extra")
    assert 9001 not in await applied_versions(database_url)


async def test_a_migration_gets_its_lock_once_the_holder_is_done(
    database_url: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_migration(monkeypatch, 9001, "add_column", "ALTER TABLE tasks ADD COLUMN extra int;")
    holder = await asyncpg.connect(database_url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("LOCK TABLE tasks IN ACCESS SHARE MODE")
    running = asyncio.create_task(
        migrate(database_url, lock_timeout=0.2, lock_tries=12, retry_wait=0.1)
    )
    try:
        # Wait until the migration has tried (and waited for) the lock once.
        deadline = asyncio.get_running_loop().time() + 20
        while not await db.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = 'tasks' AND NOT l.granted"
        ):
            assert asyncio.get_running_loop().time() < deadline, "the migration never waited"
            await asyncio.sleep(0.01)
        await transaction.commit()
        report = await running
    finally:
        await holder.close()
    assert report.applied == ["9001_add_column"]
    assert await column_exists(db, "extra")


async def test_an_index_a_failed_concurrent_build_left_invalid_is_built_again(
    database_url: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A unique index over duplicates fails half way and stays, invalid, as a
    # CREATE INDEX CONCURRENTLY cut short by a lock timeout or a cancel would.
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 30 FROM generate_series(1, 2)"
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("CREATE UNIQUE INDEX CONCURRENTLY tasks_by_type ON tasks (type)")
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'tasks_by_type'::regclass"
    assert await db.fetchval(valid) is False
    with_migration(
        monkeypatch,
        9002,
        "index_by_type",
        "-- taskq:no-transaction\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_by_type ON tasks (type);\n",
    )
    report = await migrate(database_url)
    assert report.applied == ["9002_index_by_type"]
    assert await db.fetchval(valid) is True
    unique = "SELECT indisunique FROM pg_index WHERE indexrelid = 'tasks_by_type'::regclass"
    assert await db.fetchval(unique) is False


def test_a_no_transaction_migration_is_split_into_its_statements() -> None:
    migration = sql.Migration(
        9003,
        "split",
        "-- taskq:no-transaction\n-- a comment;\nALTER TABLE t\n    ADD COLUMN a int;\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_a ON t (a);\n",
    )
    assert not migration.transactional
    assert migration.statements() == [
        "ALTER TABLE t\n    ADD COLUMN a int;",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_a ON t (a);",
    ]
    assert migration.concurrent_indexes() == ["t_a"]
    with pytest.raises(ValueError, match="dollar-quoted"):
        sql.Migration(9004, "body", "-- taskq:no-transaction\nDO $$ BEGIN END $$;\n").statements()


async def test_0015_gives_up_the_keys_of_duplicates_a_waiting_holder_let_in(
    database_url: str, db: asyncpg.Connection
) -> None:
    # As before 0015: tasks_unique_key ignored WAITING rows, so a duplicate of a
    # waiting task's key could be inserted. 0015 runs again over such rows.
    await db.execute("DROP INDEX tasks_unique_holder")
    await db.execute(
        "CREATE UNIQUE INDEX tasks_unique_key ON tasks (unique_key)"
        " WHERE unique_key IS NOT NULL AND ("
        " (status = 'ENQUEUED' AND (unique_while <> 'queued' OR started_at IS NULL))"
        " OR (status = 'RUNNING' AND unique_while <> 'queued')"
        " OR (status = 'SUCCEEDED' AND unique_while = 'until_finished'))"
    )
    await db.execute("DELETE FROM taskq_migrations WHERE version = 15")
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    rows = [
        # (name, status, unique_key, unique_while, started, created seconds ago)
        ("a_waiting", "WAITING", "demo.noop/a", "active", False, 30),
        ("a_enqueued", "ENQUEUED", "demo.noop/a", "active", False, 20),
        ("b_older", "WAITING", "demo.noop/b", "queued", False, 30),
        ("b_younger", "WAITING", "demo.noop/b", "until_finished", False, 20),
        ("c_started", "WAITING", "demo.noop/c", "queued", True, 30),  # holds nothing
        ("c_enqueued", "ENQUEUED", "demo.noop/c", "queued", False, 20),
        ("d_alone", "WAITING", "demo.noop/d", "active", False, 30),
    ]
    for name, status, key, while_, started, age in rows:
        await db.execute(
            "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
            " wait_reason, unique_key, unique_while, started_at, created_at)"
            " VALUES (gen_random_uuid(), 'demo.noop', 'default', $1::jsonb, 3, 30, $2,"
            " CASE WHEN $2 = 'WAITING' THEN 'paused' END, $3, $4,"
            " CASE WHEN $5 THEN now() END, now() - make_interval(secs => $6))",
            f'{{"name": "{name}"}}', status, key, while_, started, age,
        )  # fmt: skip

    report = await migrate(database_url)
    assert report.applied == ["0015_unique_waiting"]
    keys = {
        row["name"]: row["unique_key"]
        for row in await db.fetch("SELECT payload->>'name' AS name, unique_key FROM tasks")
    }
    assert keys == {
        "a_waiting": None, "a_enqueued": "demo.noop/a",
        "b_older": "demo.noop/b", "b_younger": None,
        "c_started": "demo.noop/c", "c_enqueued": "demo.noop/c",
        "d_alone": "demo.noop/d",
    }  # fmt: skip
    indexes = await db.fetch(
        "SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname IN ('tasks_unique_key', 'tasks_unique_holder')"
    )
    assert [(row["name"], row["valid"]) for row in indexes] == [("tasks_unique_holder", True)]
    # Every statement runs again harmlessly.
    await db.execute("DELETE FROM taskq_migrations WHERE version = 15")
    assert (await migrate(database_url)).applied == ["0015_unique_waiting"]
