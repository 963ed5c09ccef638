"""taskq behind PgBouncer in transaction pooling mode (issue 19, item 5).

A private PgBouncer (:mod:`tests.support.pgbouncer`, Debian's 1.18 binary) lends
server connections per transaction. The API, the Python client, the worker and the
harness reach the database through it (``TASKQ_DATABASE_URL``) with
``TASKQ_DATABASE_POOLER=pgbouncer``, which turns asyncpg's named statement cache
off; what keeps session state (LISTEN, the leader locks, ``taskq migrate``) takes
``TASKQ_DATABASE_SESSION_URL``, Postgres itself. Every test also checks that no log
record speaks of a prepared statement and that its database's traffic did pass
through the bouncer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from taskq.client import Client
from taskq.errors import Fail, TaskFailed
from taskq.fleet.leader import lock_key
from taskq.fleet.relay import LOCK_KEY as RELAY_LOCK_KEY
from taskq.fleet.sweeper import LOCK_KEY as SWEEPER_LOCK_KEY
from taskq.handlers import Context, Registry, Schedule
from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology, put_type, running_api
from tests.support.pgbouncer import PROBE_DATABASE, PrivateBouncer, pgbouncer
from tests.support.services import delete_namespace, make_settings, run_taskq
from tests.support.worker_fixtures import poll, running_worker, until

__all__ = ["pgbouncer"]  # a fixture, used by name

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def admin(bouncer: PrivateBouncer, command: str) -> list[dict[str, Any]]:
    """Rows of a command on the bouncer's admin console (simple query protocol only:
    psycopg sends a query without parameters that way)."""
    with psycopg.connect(bouncer.admin_url, autocommit=True) as connection:
        cursor = connection.execute(command)
        if cursor.description is None:
            return []
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def bounced(bouncer: PrivateBouncer, database_url: str, amqp_url: str, namespace: str) -> Settings:
    """Settings whose pools go through ``bouncer`` and whose sessions go straight to
    ``database_url``."""
    return make_settings(
        database_url=bouncer.via(database_url),
        database_session_url=database_url,
        database_pooler="pgbouncer",
        amqp_url=amqp_url,
        namespace=namespace,
        max_delay="1h",
        backoff_strategy="fixed",
        backoff_fixed="0.2s",
    )


@pytest.fixture
def prepared_statements_unheard_of(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No log record mentions a prepared statement (what named statements behind a
    transaction pooler fail with: ``prepared statement "..." does not exist``)."""
    caplog.set_level(logging.INFO)
    yield
    said = [r.getMessage() for r in caplog.records if "prepared statement" in r.getMessage()]
    assert not said, said


@pytest.fixture
async def settings(
    pgbouncer: PrivateBouncer,
    database_url: str,
    amqp_url: str,
    namespace: str,
    prepared_statements_unheard_of: None,
) -> AsyncIterator[Settings]:
    """Settings through the bouncer; afterwards, its stats show the test's traffic."""
    value = bounced(pgbouncer, database_url, amqp_url, namespace)
    await declare_topology(value)
    yield value
    await delete_namespace(value)
    database = database_url.rpartition("/")[2]
    stats = {row["database"]: row for row in admin(pgbouncer, "SHOW STATS")}
    assert stats[database]["total_xact_count"] > 0, "nothing went through the bouncer"
    assert "prepared statement" not in pgbouncer.log_text()


def first_attempt_fails() -> Registry:
    registry = Registry()

    @registry.task("pb.quick")
    async def quick(payload: dict[str, Any], ctx: Context) -> dict[str, int]:
        return {"n": payload["n"], "attempt": ctx.attempt}

    @registry.task("pb.flaky", max_attempts=3)
    async def flaky(payload: dict[str, Any], ctx: Context) -> dict[str, int]:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return {"attempt": ctx.attempt}

    @registry.task("pb.fatal")
    async def fatal(payload: dict[str, Any], ctx: Context) -> None:
        raise Fail("refused for good")

    return registry


async def test_transaction_pooling_shares_sessions_and_loses_named_statements(
    pgbouncer: PrivateBouncer,
) -> None:
    """What the settings guard against, shown on a pool of one server connection:
    two clients share one session, and a named statement is gone once the bouncer
    swaps the server connection; unnamed statements (no cache) do not care."""
    url = pgbouncer.url(PROBE_DATABASE)
    one, other = await asyncpg.connect(url), await asyncpg.connect(url)
    unnamed = await asyncpg.connect(url, statement_cache_size=0)
    try:
        assert await one.fetchval("SELECT pg_backend_pid()") == await other.fetchval(
            "SELECT pg_backend_pid()"
        )
        await one.execute("SELECT set_config('taskq.probe', 'from one', false)")
        assert await other.fetchval("SELECT current_setting('taskq.probe', true)") == "from one"

        assert await one.fetchval("SELECT $1::int + 1", 1) == 2  # prepared and cached
        assert await unnamed.fetchval("SELECT $1::int + 1", 1) == 2
        admin(pgbouncer, f"RECONNECT {PROBE_DATABASE}")  # new server connections
        with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
            await one.fetchval("SELECT $1::int + 1", 1)
        assert await unnamed.fetchval("SELECT $1::int + 1", 2) == 3
    finally:
        for connection in (one, other, unnamed):
            await connection.close()


async def test_migrate_takes_the_session_url(
    pgbouncer: PrivateBouncer,
    empty_database_url: str,
    amqp_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    """``taskq migrate`` holds a session lock and sets session settings: it runs on the
    session URL (and creates the database there), never through the bouncer."""
    settings = bounced(pgbouncer, empty_database_url, amqp_url, namespace)
    code, out, err = await run_taskq(settings, tmp_path, "migrate")
    assert code == 0, err
    assert "applied" in out
    connection = await asyncpg.connect(settings.database_url, statement_cache_size=0)
    try:
        assert await connection.fetchval("SELECT count(*) > 10 FROM taskq.taskq_migrations")
    finally:
        await connection.close()
    code, out, err = await run_taskq(settings, tmp_path, "migrate")
    assert code == 0, err


async def test_enqueue_over_http_and_the_client(settings: Settings, db: asyncpg.Connection) -> None:
    async with running_api(settings) as api:
        await put_type(api, "pb.quick")
        single = await api.post("/enqueue", json={"type": "pb.quick", "payload": {"n": 1}})
        assert single.status_code == 201, single.text
        tasks = [{"type": "pb.quick", "payload": {"n": n}} for n in range(50)]
        batch = await api.post("/enqueue/batch", json={"tasks": tasks})
        assert batch.status_code == 201, batch.text
        assert len(batch.json()["tasks"]) == 50
        keyed = {"type": "pb.quick", "payload": {"n": 2}, "idempotency_key": "order-2"}
        first, again = [await api.post("/enqueue", json=keyed) for _ in range(2)]
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        # Concurrent requests: the API's pool connections share the bouncer's servers.
        answers = await asyncio.gather(
            *(
                api.post("/enqueue", json={"type": "pb.quick", "payload": {"n": n}})
                for n in range(40)
            )
        )
        assert {a.status_code for a in answers} == {201}
        got = await api.get(f"/tasks/{single.json()['id']}")
        assert got.status_code == 200 and got.json()["status"] == "ENQUEUED"

    async with Client.connect(settings) as client:
        one = await client.enqueue("pb.quick", {"n": 3})
        assert one.created
        many = await client.enqueue_many("pb.quick", [{"n": n} for n in range(20)])
        assert len(many) == 20 and all(r.created for r in many)
        keyed_first = await client.enqueue("pb.quick", {"n": 4}, idempotency_key="order-4")
        replay = await client.enqueue("pb.quick", {"n": 4}, idempotency_key="order-4")
        assert keyed_first.created and not replay.created
        assert replay.task["id"] == keyed_first.task["id"]
    assert await db.fetchval("SELECT count(*) FROM tasks") == 1 + 50 + 1 + 40 + 1 + 20 + 1


async def test_a_worker_claims_runs_inline_retries_and_wakes_waiters(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with (
        running_worker(settings, first_attempt_fails(), inline_window=1.0, concurrency=50),
        Client.connect(settings) as client,
    ):
        quick = await client.enqueue("pb.quick", {"n": 7})
        done = await client.wait(quick.task["id"], timeout=30)  # LISTEN on the session URL
        assert done.result_value() == {"n": 7, "attempt": 1}
        flaky = await client.enqueue("pb.flaky", {})
        retried = await client.wait(flaky.task["id"], timeout=30)
        assert retried.attempts == 2 and retried.result_value() == {"attempt": 2}
        fatal = await client.enqueue("pb.fatal", {})
        with pytest.raises(TaskFailed, match="refused for good"):
            await client.wait(fatal.task["id"], timeout=30)
        # A load that makes the worker's claims and outcomes share the servers.
        many = await client.enqueue_many("pb.quick", [{"n": n} for n in range(300)])
        ids = [r.task["id"] for r in many]
        ended = await asyncio.gather(*(client.wait(i, timeout=60) for i in ids))
        assert sorted(t.result_value()["n"] for t in ended) == list(range(300))

    # The inline window: claim and outcome in one transaction, through the bouncer.
    rows = await db.fetch(
        "SELECT status, xmin::text AS tx FROM task_events WHERE task_id = $1 ORDER BY id",
        quick.task["id"],
    )
    assert [r["status"] for r in rows] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
    assert rows[1]["tx"] == rows[2]["tx"]


async def direct_holders(db: asyncpg.Connection, key: int) -> list[str]:
    """The application names of the sessions holding advisory lock ``key`` in this
    test's database (other tests' databases have the same keys)."""
    rows = await db.fetch(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
        " AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        key,
    )
    return [r["application_name"] for r in rows]


async def test_pauses_leader_locks_and_schedules_use_session_connections(
    settings: Settings, pgbouncer: PrivateBouncer, db: asyncpg.Connection
) -> None:
    ran: list[dict[str, Any]] = []
    registry = Registry()

    @registry.task("pb.pulse", schedule=Schedule(every="1s", payload={"n": 1}, catch_up="skip"))
    async def pulse(payload: dict[str, Any], ctx: Context) -> None:
        ran.append(payload)

    @registry.task("pb.low", queue="low")
    async def low(payload: dict[str, Any], ctx: Context) -> None:
        ran.append(payload)

    async with (
        running_api(settings, relay=False) as api,
        running_worker(settings, registry) as worker,
    ):
        # A schedule fires: the sweeper leads through its lock session.
        await poll(lambda: {"n": 1} in ran, "the schedule did not fire")
        sweeper_key = lock_key(SWEEPER_LOCK_KEY, settings.db_schema)
        relay_key = lock_key(RELAY_LOCK_KEY, settings.db_schema)
        sweeper = await direct_holders(db, sweeper_key)
        relay = await direct_holders(db, relay_key)
        assert sweeper == [f"taskq sweeper lock, pid {os.getpid()}"]
        assert relay == [f"taskq relay lock, pid {os.getpid()}"]
        # Neither lock sits on a server connection the bouncer lends.
        lent = {row["remote_pid"] for row in admin(pgbouncer, "SHOW SERVERS")}
        holders = await db.fetch(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = ANY($1::bigint[])",
            [sweeper_key, relay_key],
        )
        assert len(holders) == 2 and lent and not lent & {r["pid"] for r in holders}

        # A pause reaches the worker through its LISTEN session (the NOTIFY is sent
        # by the API's transaction through the bouncer).
        paused = await api.post("/queues/low/pause", json={"reason": "through pgbouncer"})
        assert paused.status_code == 200, paused.text
        await poll(lambda: "low" in worker.paused_queues, "the worker did not take the pause in")
        waiting = await api.post("/enqueue", json={"type": "pb.low", "payload": {"low": 1}})
        assert waiting.status_code == 201
        resumed = await api.post("/queues/low/resume", json={})
        assert resumed.status_code == 200, resumed.text
        await poll(lambda: "low" not in worker.paused_queues, "the resume did not arrive")
        await poll(lambda: {"low": 1} in ran, "the task of the resumed queue did not run")

        async def fired_rows() -> bool:
            count = await db.fetchval("SELECT count(*) FROM tasks WHERE type = 'pb.pulse'")
            return bool(count >= 2)

        await until(fired_rows, "the schedule did not fire twice")
