"""Real services for the tests: Postgres and RabbitMQ, isolated per test.

Service URLs come from ``TASKQ_TEST_DATABASE_URL`` / ``TASKQ_TEST_AMQP_URL`` /
``TASKQ_TEST_MANAGEMENT_URL``, then the local defaults, then testcontainers when a
Docker engine answers. A missing service skips the test locally and fails it
when ``CI`` is set: in CI integration tests never skip.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest

# A developer's TASKQ_* variables (or a .env) must not leak into the tests.
for _name in list(os.environ):
    if _name.startswith("TASKQ_") and not _name.startswith("TASKQ_TEST_"):
        del os.environ[_name]

from taskq._utils import format_duration  # noqa: E402
from taskq.migrate import migrate  # noqa: E402
from taskq.settings import Settings, load_settings  # noqa: E402

CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672"


def unavailable(what: str, error: BaseException | str) -> None:
    message = f"{what} is not available: {error}"
    if CI:
        pytest.fail(f"{message} (CI is set, so integration tests may not skip)")
    pytest.skip(message)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


async def _can_connect_postgres(url: str) -> None:
    connection = await asyncpg.connect(url, timeout=5)
    await connection.close()


async def _can_connect_amqp(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL whose user may create databases (the maintenance database of a server)."""
    url = os.environ.get("TASKQ_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        asyncio.run(_can_connect_postgres(url))
    except Exception as exc:
        if not _docker_answers():
            unavailable("Postgres", exc)
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as container:
            yield container.get_connection_url()
        return
    yield url


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("TASKQ_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    try:
        asyncio.run(_can_connect_amqp(url))
    except Exception as exc:
        if not _docker_answers():
            unavailable("RabbitMQ", exc)
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    yield url


@pytest.fixture(scope="session")
def management_url(amqp_url: str) -> str:
    """The RabbitMQ management API (http://user:pass@host:15672), to read back declarations."""
    url = os.environ.get("TASKQ_TEST_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL)
    try:
        httpx.get(url + "/api/overview", timeout=5).raise_for_status()
    except Exception as exc:
        unavailable("the RabbitMQ management API", exc)
    return url


@pytest.fixture(scope="session")
def template_database(postgres_server_url: str) -> Iterator[str]:
    """A database migrated once per session; tests get clones of it."""
    name = f"taskq_template_{uuid.uuid4().hex[:10]}"
    asyncio.run(migrate(_with_database(postgres_server_url, name)))
    yield name
    asyncio.run(_drop_database(postgres_server_url, name))


async def read_unqualified(connection: asyncpg.Connection, database: str) -> None:
    """Let the tests' own SQL name taskq's tables unqualified in ``database``.

    taskq's objects live in the ``taskq`` schema. The tests read and write them
    with plain SQL (``SELECT ... FROM tasks``), so their databases look there
    first (a database's default, for sessions opened from now on). taskq's own
    SQL never relies on it: test_schema prepares every query block with an empty
    search_path, and test_db_schema runs taskq in databases without this default.
    """
    await connection.execute(f'ALTER DATABASE "{database}" SET search_path = taskq, public')


async def _drop_database(server_url: str, name: str) -> None:
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"taskq_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        await read_unqualified(connection, name)
    finally:
        await connection.close()
    yield _with_database(postgres_server_url, name)
    await _drop_database(postgres_server_url, name)


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped afterwards if created."""
    name = f"taskq_empty_{uuid.uuid4().hex[:12]}"
    yield _with_database(postgres_server_url, name)
    await _drop_database(postgres_server_url, name)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so its exchanges and queues touch no other test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def settings(database_url: str, amqp_url: str, namespace: str) -> AsyncIterator[Settings]:
    """Settings for an isolated database and namespace; the namespace is deleted afterwards."""
    # One hour of delay levels (12) declares faster than the default 30 days (22).
    value = make_settings(
        database_url=database_url, amqp_url=amqp_url, namespace=namespace, max_delay="1h"
    )
    yield value
    await delete_namespace(value)


@pytest.fixture
async def amqp_settings(amqp_url: str, namespace: str) -> AsyncIterator[Settings]:
    """Settings for an isolated namespace only (no database); deleted afterwards."""
    value = make_settings(amqp_url=amqp_url, namespace=namespace)
    yield value
    await delete_namespace(value)


def make_settings(**overrides: Any) -> Settings:
    return load_settings(_env_file=None, **overrides)


async def delete_namespace(settings: Settings) -> None:
    """Delete every exchange and queue the namespace's topology names."""
    topology = settings.topology()
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for queue in topology.queues:
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)
    finally:
        await connection.close()


def subprocess_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
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
    env.update(extra)
    return env
