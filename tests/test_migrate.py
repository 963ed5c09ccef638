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

from .conftest import subprocess_env

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
        rows = await connection.fetch("SELECT version FROM taskq_migrations ORDER BY version")
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
