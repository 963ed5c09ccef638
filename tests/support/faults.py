"""What the fault scenarios share: the ``taskq`` processes they start and kill, polling,
and the audit every scenario ends with (every accepted task terminal, no task with two
SUCCEEDED events, nothing stuck RUNNING or ENQUEUED past its due time) and its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from taskq.settings import Settings

from .services import subprocess_env
from .worker_fixtures import Harness

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
# Short leases and sweeper thresholds, so that recovery happens within seconds.
FAST = {
    "TASKQ_LEASE_SECONDS": "2",
    "TASKQ_SWEEPER_OVERDUE_AFTER": "1",
    "TASKQ_SWEEPER_CHECK_EVERY": "0.5",
    "TASKQ_WORKER_SHUTDOWN_GRACE": "2",
}


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.2
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(every)


class Processes:
    """The ``taskq`` processes a test starts; :meth:`kill_all` SIGKILLs the ones left."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.started: list[asyncio.subprocess.Process] = []

    async def start(self, *args: str, **env: str) -> asyncio.subprocess.Process:
        name = f"{args[0]}-{len(self.started)}-{uuid.uuid4().hex[:6]}.log"
        with (self.tmp_path / name).open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "taskq",
                *args,
                env=subprocess_env(self.settings, **env),
                cwd=self.tmp_path,
                stdout=log,
                stderr=log,
            )
        self.started.append(process)
        return process

    async def worker(self, *args: str, **env: str) -> asyncio.subprocess.Process:
        return await self.start("worker", "taskq.demo", *args, **{**FAST, **env})

    @staticmethod
    async def kill(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def stop(self, process: asyncio.subprocess.Process) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 20)
        await self.kill(process)
        assert process.returncode is not None
        return process.returncode

    async def kill_all(self) -> None:
        for process in self.started:
            await self.kill(process)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for path in self.tmp_path.glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        lines.append(json.loads(line))
        return lines


@contextlib.asynccontextmanager
async def processes(settings: Settings, tmp_path: Path) -> AsyncIterator[Processes]:
    started = Processes(settings, tmp_path)
    try:
        yield started
    finally:
        await started.kill_all()


async def worker_ready(h: Harness, count: int = 1) -> None:
    """Wait until ``count`` consumers are attached to the default work queue."""

    async def ready() -> bool:
        return (await queue_depth(h, h.names.queue("default")))[1] >= count

    await eventually(ready, 30, f"{count} workers consuming")


async def queue_depth(h: Harness, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, read fresh (aio-pika caches passive declares)."""
    channel = await h.connection.channel()
    try:
        raw = await channel.get_underlay_channel()
        declared = await raw.queue_declare(name, passive=True, timeout=5)
        return declared.message_count or 0, declared.consumer_count or 0
    finally:
        await channel.close()


async def statuses(db: asyncpg.Connection, ids: list[uuid.UUID]) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT status, count(*) FROM tasks WHERE id = ANY($1::uuid[]) GROUP BY status", ids
    )
    return {row["status"]: row["count"] for row in rows}


# The shares of the work done at which kill_as_work_progresses kills a worker.
KILL_AT = (0.1, 0.25, 0.4, 0.55, 0.7)


async def kill_as_work_progresses(
    procs: Processes,
    workers: list[asyncio.subprocess.Process],
    start: Callable[[], Awaitable[asyncio.subprocess.Process]],
    done: Callable[[], Awaitable[int]],
    total: int,
    timeout: float = 120.0,
) -> int:
    """SIGKILL one of ``workers`` (alternately, so that the sweeper's holder dies too)
    and ``start`` another in its place each time a further share of the ``total``
    work is ``done`` (:data:`KILL_AT`): the kills land while work runs however fast
    the machine runs it, and the last tenths are left for a clean finish. Returns how
    many kills there were: fewer than ``len(KILL_AT)`` only if the work stopped
    progressing for ``timeout`` seconds."""
    kills = 0
    deadline = time.monotonic() + timeout
    while kills < len(KILL_AT) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if await done() < total * KILL_AT[kills]:
            continue
        index = kills % len(workers)
        await procs.kill(workers[index])
        kills += 1
        workers[index] = await start()
        deadline = time.monotonic() + timeout
    return kills


async def all_terminal(db: asyncpg.Connection, ids: list[uuid.UUID], timeout: float) -> None:
    async def done() -> bool:
        counts = await statuses(db, ids)
        return sum(counts.get(s, 0) for s in TERMINAL) == len(ids)

    try:
        await eventually(done, timeout, "every task terminal", every=0.25)
    except AssertionError:
        raise AssertionError(f"not all terminal: {await statuses(db, ids)}") from None


@dataclass
class Figures:
    scenario: str
    tasks: int
    faults: int
    lost: int = 0
    duplicate_successes: int = 0
    executions: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> None:
        extra = "".join(f", {k} = {v}" for k, v in self.extra.items())
        print(
            f"\n[fault] {self.scenario}: tasks = {self.tasks}, faults injected = {self.faults},"
            f" lost = {self.lost}, duplicate successes = {self.duplicate_successes},"
            f" executions = {self.executions} (for {self.tasks} tasks),"
            f" statuses = {self.statuses}{extra}"
        )


async def audit(
    db: asyncpg.Connection,
    ids: list[uuid.UUID],
    scenario: str,
    faults: int,
    extra: dict[str, Any] | None = None,
) -> Figures:
    """The promises every scenario ends with; returns the figures."""
    rows = await db.fetch("SELECT id, status FROM tasks WHERE id = ANY($1::uuid[])", ids)
    found = {row["id"]: row["status"] for row in rows}
    lost = [i for i in ids if i not in found or found[i] not in TERMINAL]
    duplicates = await db.fetch(
        "SELECT task_id, count(*) FROM task_events WHERE status = 'SUCCEEDED'"
        " GROUP BY task_id HAVING count(*) > 1"
    )
    stuck = await db.fetch(
        "SELECT id, status, run_at, lease_expires_at FROM tasks"
        " WHERE status = 'RUNNING'"
        "    OR (status = 'ENQUEUED' AND run_at < now() - interval '2 seconds')"
    )
    executions = 0
    if await db.fetchval("SELECT to_regclass('demo_executions') IS NOT NULL"):
        executions = await db.fetchval(
            "SELECT count(*) FROM demo_executions WHERE task_id = ANY($1::uuid[])", ids
        )
        unexecuted = await db.fetchval(
            "SELECT count(*) FROM tasks t WHERE t.id = ANY($1::uuid[]) AND t.status = 'SUCCEEDED'"
            " AND t.type = 'demo.record'"
            " AND NOT EXISTS (SELECT 1 FROM demo_executions e WHERE e.task_id = t.id)",
            ids,
        )
        assert unexecuted == 0, f"{unexecuted} tasks SUCCEEDED without running"
    figures = Figures(
        scenario,
        tasks=len(ids),
        faults=faults,
        lost=len(lost),
        duplicate_successes=len(duplicates),
        executions=executions,
        statuses=await statuses(db, ids),
        extra=extra or {},
    )
    figures.report()
    assert not lost, f"{len(lost)} accepted tasks not terminal, e.g. {lost[:5]}"
    assert not duplicates, f"tasks with two SUCCEEDED events: {[dict(r) for r in duplicates]}"
    assert not stuck, f"stuck tasks: {[dict(r) for r in stuck[:5]]}"
    return figures
