"""Frozen processes (issue 13): a leader or a worker SIGSTOPped, holding its connections.

A stopped process keeps its TCP connections open, so neither Postgres nor
RabbitMQ sees it go; only the bounds taskq sets on its sessions make the
fleet go on without it:

7. the relay's and the sweeper's leaders frozen (the API leads the relay here):
   another process takes both locks within 30 s, recovers an expired lease and
   publishes tasks enqueued inside a caller's transaction; the leaders, resumed,
   find out that they lead no more;
8. a worker frozen while it runs a task and holds a full prefetch buffer: the
   broker drops its silent connection (the AMQP heartbeat) and requeues the
   buffer, the sweeper takes its expired lease back, another worker runs every
   task; resumed, the frozen worker records nothing.

Both end with the audit of :mod:`tests.support.faults` and print their figures.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from taskq.client import Client
from taskq.fleet import relay, sweeper
from taskq.model import ClaimedTask
from taskq.settings import Settings
from taskq.store import NewTask
from tests.support.faults import (
    Processes,
    all_terminal,
    audit,
    eventually,
    processes,
    queue_depth,
    worker_ready,
)
from tests.support.services import free_port
from tests.support.worker_fixtures import Harness, harness

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
    assert isinstance(claim, ClaimedTask)
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


# ---------------------------------------------------------------------- scenario 8


async def test_a_frozen_worker_keeps_its_envelopes_briefly_and_records_nothing(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """A worker (concurrency 1, prefetch 8) frozen with a task running and 8 envelopes
    buffered; the AMQP heartbeat is the default (10 s: RabbitMQ drops the silent
    connection after about 30 s), the lease 10 s."""
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        await h.put_type("demo.record", timeout=60)
        # The sweeper's leader, consuming another queue, so that it runs none of them.
        await procs.start("worker", "taskq.demo", "--queues", "low", **SHORT_LEASE)
        await held(db, sweeper.LOCK_KEY)
        frozen = await procs.start(
            "worker", "taskq.demo", "--concurrency", "1", "--prefetch", "8", **LEASE_10S
        )
        await worker_ready(h, 1)
        client = await Client.connect(settings)
        try:
            results = await client.enqueue_many(
                [{"type": "demo.record", "payload": {"seconds": 1.5}, "max_attempts": 5}] * 12
            )
        finally:
            await client.close()
        ids = [uuid.UUID(str(r.id)) for r in results]
        worker_id = await db.fetchval("SELECT id FROM workers WHERE pid = $1", frozen.pid)

        async def running_and_full() -> bool:
            running = await db.fetchval(
                "SELECT count(*) FROM tasks WHERE status = 'RUNNING' AND worker_id = $1", worker_id
            )
            # 12 = 1 running + 8 buffered (unacked) + 3 ready in the queue.
            return running == 1 and (await queue_depth(h, h.names.queue("default")))[0] == 3

        await eventually(running_and_full, 30, "a task running and 8 envelopes buffered", 0.05)
        stopped_at = await db.fetchval("SELECT now()")
        frozen.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        await procs.start("worker", "taskq.demo", "--concurrency", "8", **SHORT_LEASE)
        # Within about 30 s of the lease's expiry (10 s) every task ran elsewhere.
        await all_terminal(db, ids, timeout=10 + 35)
        finished = time.monotonic() - frozen_at
        frozen.send_signal(signal.SIGCONT)

        async def noticed() -> bool:
            text = log_of(procs, frozen)
            lost = "lease lost" in text or "was not recorded" in text
            return lost and "lost the broker connection" in text

        await eventually(noticed, 30, "the resumed worker noticing its losses")
        # Its attempt was taken back (an ENQUEUED event naming it); nothing else of it.
        landed = await db.fetchval(
            "SELECT count(*) FROM task_events WHERE worker_id = $1 AND at > $2"
            " AND status <> 'ENQUEUED'",
            worker_id,
            stopped_at,
        )
        finals = await db.fetchval(
            "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND worker_id = $2",
            ids,
            worker_id,
        )
        extra = {"all done after the freeze (s)": round(finished, 1)}
        figures = await audit(db, ids, "8 frozen worker", faults=1, extra=extra)
        for process in procs.started:
            await procs.stop(process)
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert landed == 0 and finals == 0, "the resumed worker recorded something"
