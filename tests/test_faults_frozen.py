"""Frozen processes (issue 13): a leader or a worker SIGSTOPped, holding its connections.

A stopped process keeps its TCP connections open, so neither Postgres nor
RabbitMQ sees it go; only the bounds taskq sets on its sessions make the
fleet go on without it:

7. the relay's and the sweeper's leaders frozen (the API leads the relay here):
   another process takes both locks within 30 s, recovers an expired lease and
   publishes tasks enqueued inside a caller's transaction; the leaders, resumed,
   find out that they lead no more.

It ends with the audit of :mod:`tests.test_faults` and print their figures.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from taskq import relay, sweeper
from taskq.client import Client
from taskq.settings import Settings
from taskq.store import NewTask

from .test_faults import (
    Processes,
    all_terminal,
    audit,
    eventually,
    free_port,
    processes,
    worker_ready,
)
from .worker_fixtures import Harness, harness

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(180)]

# Short leases; the sweeper's lost-envelope check left at its default (60 s),
# so that it is not what brings a frozen worker's envelopes back.
SHORT_LEASE = {"TASKQ_LEASE_SECONDS": "2", "TASKQ_WORKER_SHUTDOWN_GRACE": "2"}
LEASE_10S = {"TASKQ_LEASE_SECONDS": "10", "TASKQ_WORKER_SHUTDOWN_GRACE": "2"}
TAKEOVER_BOUND = 30.0


async def holder(db: asyncpg.Connection, key: int) -> int | None:
    """The backend (session) pid holding an advisory lock of this database, if any."""
    pid: int | None = await db.fetchval(
        "SELECT l.pid FROM pg_locks l"
        " WHERE l.locktype = 'advisory' AND l.granted"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        "   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        key,
    )
    return pid


async def held(db: asyncpg.Connection, key: int) -> int:
    """Wait until someone holds the lock; its session's pid."""
    found: list[int] = []

    async def taken() -> bool:
        pid = await holder(db, key)
        found[:] = [pid] if pid is not None else []
        return bool(found)

    await eventually(taken, 30, f"lock {key:#x} taken")
    return found[0]


async def moved(db: asyncpg.Connection, key: int, before: int) -> bool:
    return await holder(db, key) not in (None, before)


def log_of(procs: Processes, process: asyncio.subprocess.Process) -> str:
    index = procs.started.index(process)
    return "".join(path.read_text() for path in procs.tmp_path.glob(f"*-{index}-*.log"))


async def enqueue_in_transaction(client: Client, database_url: str) -> uuid.UUID:
    """A task enqueued inside the caller's own transaction: the relay publishes it."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            result = await client.enqueue("demo.record", {}, connection=connection)
    finally:
        await connection.close()
    return uuid.UUID(str(result.task["id"]))


async def expired_claim(h: Harness) -> uuid.UUID:
    """A task claimed by a worker that is gone, its lease about to expire."""
    task_id = uuid.uuid4()
    [result] = await h.store.enqueue([NewTask(task_id, "demo.record", "{}")])
    assert result.outcome == "created"
    [claim] = await h.store.claim([task_id], "gone-worker", 0.5)
    assert claim["decision"] == "claimed"
    return task_id


# ---------------------------------------------------------------------- scenario 7


async def test_frozen_leaders_are_replaced_and_find_out_when_resumed(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        await h.put_type("demo.record", timeout=60)
        # Started one by one, each takes what is free: the API the relay's lock,
        # the next worker the sweeper's; the last one waits for both.
        api = await procs.start("api", "--port", str(free_port()))
        relay_session = await held(db, relay.LOCK_KEY)
        # The sweeper's leader consumes another queue: the tasks run elsewhere.
        leader = await procs.start("worker", "taskq.demo", "--queues", "low", **SHORT_LEASE)
        sweeper_session = await held(db, sweeper.LOCK_KEY)
        standby = await procs.start("worker", "taskq.demo", **SHORT_LEASE)
        await worker_ready(h, 1)
        client = await Client.connect(settings)
        try:
            api.send_signal(signal.SIGSTOP)
            leader.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            # Work only an active sweeper and an active relay do.
            ghost = await expired_claim(h)
            before = await enqueue_in_transaction(client, settings.database_url)

            async def taken_over() -> bool:
                return await moved(db, relay.LOCK_KEY, relay_session) and await moved(
                    db, sweeper.LOCK_KEY, sweeper_session
                )

            await eventually(taken_over, TAKEOVER_BOUND, "another process leading both")
            takeover = time.monotonic() - frozen_at
            leaders = (await holder(db, relay.LOCK_KEY), await holder(db, sweeper.LOCK_KEY))
            after = await enqueue_in_transaction(client, settings.database_url)
        finally:
            await client.close()
        ids = [ghost, before, after]
        await all_terminal(db, ids, timeout=30)
        recovered = await db.fetchval(
            "SELECT count(*) FROM task_events WHERE task_id = $1"
            " AND error = 'lease expired: worker gone-worker stopped heartbeating'",
            ghost,
        )
        # Resumed, the old leaders find out before they act as leaders again.
        for process in (api, leader):
            process.send_signal(signal.SIGCONT)

        async def told(process: asyncio.subprocess.Process, name: str) -> bool:
            return f"this process is no longer the active {name}" in log_of(procs, process)

        await eventually(lambda: told(api, "relay"), 30, "the API saying it lost the relay")
        await eventually(lambda: told(leader, "sweeper"), 30, "the worker saying it lost it")
        assert (await holder(db, relay.LOCK_KEY), await holder(db, sweeper.LOCK_KEY)) == leaders
        # The one left to take over was the standby: its lock sessions say so.
        names = await db.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE pid = ANY($1::int[])", leaders
        )
        assert {row["application_name"] for row in names} == {
            f"taskq relay lock, pid {standby.pid}",
            f"taskq sweeper lock, pid {standby.pid}",
        }
        extra = {"takeover (s)": round(takeover, 1), "leases recovered": recovered}
        figures = await audit(db, ids, "7 frozen leaders", faults=2, extra=extra)
        for process in (standby, leader, api):
            await procs.stop(process)
    assert figures.statuses == {"SUCCEEDED": 3}
    assert recovered == 1
    assert takeover <= TAKEOVER_BOUND
