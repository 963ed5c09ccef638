"""The sweeper's process killed again and again while a per-second schedule fires (issue 17).

Two worker processes run; every few seconds the one whose session holds the
sweeper's lock (found through the lock's ``application_name``, which names the
process) is SIGKILLed and another worker started. A schedule that catches up
``all`` must still be enqueued exactly once for every second between its first
and its last fire: the fire is an enqueue whose idempotency key is the schedule
and fire time, so the new leader fires what the old one missed, and never
doubles what it fired. A schedule that catches up ``skip`` never doubles either,
and fires again after the last kill.

The long version (3 minutes, with lateness figures) is
``scripts/bench_schedules.py --seconds 180 --kill-every 4``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from taskq.fleet import sweeper
from taskq.fleet.schedules import schedule_spec
from taskq.settings import Settings
from tests.support.faults import eventually, processes
from tests.support.worker_fixtures import harness

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(240)]

RUN_SECONDS = 40.0
KILL_EVERY = 4.0
_PID = re.compile(r"pid (\d+)")


async def sweeper_process(db: asyncpg.Connection) -> int | None:
    """The OS pid of the process whose session holds the sweeper's lock, if any."""
    name: str | None = await db.fetchval(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        "   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        sweeper.LOCK_KEY,
    )
    found = _PID.search(name or "")
    return int(found.group(1)) if found else None


async def fires(db: asyncpg.Connection, name: str) -> list[datetime]:
    """The fire times of a schedule's tasks, sorted, one per task row."""
    rows = await db.fetch(
        "SELECT idempotency_key FROM taskq.tasks WHERE idempotency_key LIKE $1",
        f"schedule:{name}:%",
    )
    return sorted(
        datetime.strptime(row["idempotency_key"].split(":", 2)[2], "%Y-%m-%dT%H:%M:%S.%fZ")
        for row in rows
    )


async def test_killing_the_sweeper_neither_doubles_nor_skips_a_fire(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        workers = [await procs.worker() for _ in range(2)]

        async def led() -> bool:
            return await sweeper_process(db) in {w.pid for w in workers}

        await eventually(led, 30, "a worker leads the sweeper")
        start = (await h.store.database_now()).replace(microsecond=0) + timedelta(seconds=2)
        for name, catch_up in (("pulse-all", "all"), ("pulse-skip", "skip")):
            spec, _ = schedule_spec(name, {"every": 1, "type": "demo.noop", "catch_up": catch_up})
            await h.store.put_schedule(spec, start, max_schedules=1000)

        kills = 0
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() + KILL_EVERY < deadline:
            await asyncio.sleep(KILL_EVERY)
            pid = await sweeper_process(db)
            victim = next((w for w in workers if w.pid == pid), None)
            if victim is None:
                continue  # between leaders: the next turn kills the new one
            await procs.kill(victim)
            kills += 1
            workers[workers.index(victim)] = await procs.worker()
        killed_at = await h.store.database_now()
        await eventually(led, 30, "a worker leads the sweeper after the last kill")

        async def caught_up() -> bool:
            done = await fires(db, "pulse-all")
            return bool(done) and done[-1] >= killed_at.replace(tzinfo=None) + timedelta(seconds=3)

        await eventually(caught_up, 30, "the schedule fires again after the last kill")
        for worker in workers:
            await procs.stop(worker)
        every, skipping = await fires(db, "pulse-all"), await fires(db, "pulse-skip")

    assert kills >= RUN_SECONDS / KILL_EVERY / 2, f"only {kills} sweeper kills"
    expected = [every[0] + timedelta(seconds=n) for n in range(len(every))]
    missing = sorted(set(expected) - set(every))
    print(
        f"[fault] sweeper killed {kills} times (pid {os.getpid()} ran the test):"
        f" {len(every)} fires of pulse-all, {len(skipping)} of pulse-skip"
    )
    assert every[0] == start.replace(tzinfo=None), "the first fire was skipped"
    assert every == expected, f"catch-up all: fires missing {missing[:5]}"
    assert len(set(skipping)) == len(skipping), "catch-up skip doubled a fire"
    assert skipping[-1] >= killed_at.replace(tzinfo=None), "catch-up skip stopped firing"
