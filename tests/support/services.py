"""Plain helpers around the real services: settings for a test, its namespace's
cleanup, the environment of a ``taskq`` subprocess, and skipping (or failing, under
``CI``) when a service is missing. The fixtures that use them are in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from taskq._utils import format_duration
from taskq.settings import Settings, load_settings

CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def unavailable(what: str, error: BaseException | str) -> None:
    """Skip the test for want of ``what``; under ``CI`` fail it instead."""
    message = f"{what} is not available: {error}"
    if CI:
        pytest.fail(f"{message} (CI is set, so integration tests may not skip)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(url: str, database: str) -> str:
    """``url`` with its database replaced by ``database``."""
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


async def drop_database(server_url: str, name: str) -> None:
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def make_settings(**overrides: Any) -> Settings:
    return load_settings(_env_file=None, **overrides)


async def delete_namespace(settings: Settings) -> None:
    """Delete every exchange and queue the namespace's topology names."""
    topology = settings.topology()
    connection = await aio_pika.connect(settings.amqp_urls[0])
    try:
        channel = await connection.channel()
        for queue in topology.queues:
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)
    finally:
        await connection.close()


def subprocess_env(settings: Settings | None = None, /, **extra: str) -> dict[str, str]:
    """The environment for a ``taskq`` subprocess: this one's plus the settings as TASKQ_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKQ_")}
    if settings is not None:
        env["TASKQ_DATABASE_URL"] = settings.database_url
        env["TASKQ_DB_SCHEMA"] = settings.db_schema
        env["TASKQ_AMQP_URL"] = settings.amqp_url
        env["TASKQ_NAMESPACE"] = settings.namespace
        env["TASKQ_QUEUES"] = ",".join(settings.queues)
        env["TASKQ_QUEUE_TYPE"] = settings.queue_type
        env["TASKQ_MAX_DELAY"] = format_duration(settings.max_delay)
        env["TASKQ_DELIVERY_LIMIT"] = str(settings.delivery_limit)
        env["TASKQ_DATABASE_POOLER"] = settings.database_pooler
        if settings.database_session_url:
            env["TASKQ_DATABASE_SESSION_URL"] = settings.database_session_url
    env.update(extra)
    return env


async def run_taskq(settings: Settings, cwd: Path, *args: str) -> tuple[int, str, str]:
    """Run ``python -m taskq ARGS`` with ``settings`` to its end: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskq",
        *args,
        env=subprocess_env(settings),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def read_unqualified(connection: asyncpg.Connection, database: str) -> None:
    """Let the tests' own SQL name taskq's tables unqualified in ``database``.

    taskq's objects live in the ``taskq`` schema. The tests read and write them
    with plain SQL (``SELECT ... FROM tasks``), so their databases look there
    first (a database's default, for sessions opened from now on). taskq's own
    SQL never relies on it: test_schema prepares every query block with an empty
    search_path, and test_db_schema runs taskq in databases without this default.
    """
    await connection.execute(f'ALTER DATABASE "{database}" SET search_path = taskq, public')
