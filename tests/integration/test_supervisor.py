"""`taskq worker --processes N`: the supervisor and its worker processes, as real processes.

Its pure logic (restart delays, exit descriptions, children's options) is in
``tests/unit/test_supervisor.py``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import running_api
from tests.support.services import subprocess_env
from tests.support.worker_fixtures import Harness, harness, start_worker_process

DEADLINE = 60.0  # generous: the machine may be loaded; every wait polls a condition


# ---------------------------------------------------------------- processes


def log_text(directory: Path) -> str:
    return "".join(log.read_text() for log in directory.glob("worker-*.log"))


async def wait_until_logged(directory: Path, fragment: str, count: int = 1) -> str:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while (text := log_text(directory)).count(fragment) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{fragment!r} logged {text.count(fragment)} times:\n{text}")
        await asyncio.sleep(0.1)
    return text


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[-2])  # host:pid:random


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still not {what} after {DEADLINE} s")
        await asyncio.sleep(0.1)


async def worker_ids(h: Harness) -> list[str]:
    return [worker.id for worker in await h.store.workers(missed_heartbeats=3)]


@asynccontextmanager
async def supervisor(
    settings: Settings, tmp_path: Path, *args: str, **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``taskq worker taskq.demo --processes 2 ...``, killed (SIGKILL) on exit if still running."""
    process = await start_worker_process(settings, tmp_path, "--processes", "2", *args, **env)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()  # its children stop when they see it gone
            await process.wait()


async def stop_gracefully(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), DEADLINE) == 0


async def wait_ready(tmp_path: Path, count: int = 2) -> None:
    await wait_until_logged(tmp_path, ") is ready", count)


@asynccontextmanager
async def started(
    settings: Settings, tmp_path: Path, task_type: str, *args: str, **env: str
) -> AsyncIterator[tuple[Harness, asyncio.subprocess.Process]]:
    """A harness, ``task_type`` registered, and a supervisor whose two processes have started."""
    async with harness(settings) as h, supervisor(settings, tmp_path, *args, **env) as process:
        await h.put_type(task_type, timeout=7200)
        await wait_ready(tmp_path)
        yield h, process


@pytest.mark.integration
async def test_two_processes_run_tasks_each_with_its_own_worker_id(
    settings: Settings, tmp_path: Path
) -> None:
    async with started(
        settings, tmp_path, "demo.record", "--concurrency", "1", "--prefetch", "1"
    ) as (h, process):
        async with running_api(settings) as api:
            listed = (await api.get("/workers")).json()["workers"]
        assert len(listed) == 2 and all(w["alive"] for w in listed)
        ids = [await h.enqueue("demo.record", {"seconds": 0.3}) for _ in range(10)]
        for task_id in ids:
            await h.wait_for(task_id, "SUCCEEDED", timeout=DEADLINE)
        ran = await h.store.pool.fetch("SELECT DISTINCT worker_id FROM demo_executions")
        await stop_gracefully(process)
    ran_by = {row["worker_id"] for row in ran}
    assert ran_by == {w["id"] for w in listed}
    pids = {pid_of(worker_id) for worker_id in ran_by}
    assert len(pids) == 2 and process.pid not in pids
    assert {w["pid"] for w in listed} == pids


@pytest.mark.integration
async def test_a_killed_process_is_restarted_and_every_task_finishes(
    settings: Settings, tmp_path: Path
) -> None:
    async with started(
        settings, tmp_path, "demo.sleep", "--concurrency", "2", TASKQ_LEASE_SECONDS="2"
    ) as (h, process):
        ids = [await h.enqueue("demo.sleep", {"seconds": 0.5}) for _ in range(12)]
        claimed = await h.wait_for(ids[0], "RUNNING", timeout=DEADLINE)
        assert claimed.worker_id is not None
        victim = pid_of(claimed.worker_id)
        os.kill(victim, signal.SIGKILL)
        await wait_until_logged(tmp_path, f"(pid {victim}) was killed by SIGKILL")
        await wait_ready(tmp_path, 3)  # the replacement
        rows = [await h.wait_for(task_id, "SUCCEEDED", timeout=DEADLINE) for task_id in ids]
        successes = await h.store.pool.fetchval(
            "SELECT count(*) FROM task_events WHERE status = 'SUCCEEDED'"
        )
        now_running = await worker_ids(h)
        assert process.returncode is None
        await stop_gracefully(process)
    assert successes == len(ids) == len(rows)
    # The victim's row stays until it is pruned (it could not leave); its replacement joined.
    assert len({pid_of(w) for w in now_running} - {victim}) == 2
    assert "restarting it in 1.0 s" in log_text(tmp_path)


@pytest.mark.integration
async def test_sigterm_stops_every_process_gracefully_and_exits_0(
    settings: Settings, tmp_path: Path
) -> None:
    async with started(
        settings, tmp_path, "demo.sleep", "--concurrency", "1", "--prefetch", "1"
    ) as (h, process):
        ids = [await h.enqueue("demo.sleep", {"seconds": 2}) for _ in range(2)]
        rows = [await h.wait_for(task_id, "RUNNING", timeout=DEADLINE) for task_id in ids]
        assert len({row.worker_id for row in rows}) == 2  # one in each process
        await stop_gracefully(process)
        finished = [await h.task(task_id) for task_id in ids]
        left = await worker_ids(h)
    assert [(row.status, row.attempts) for row in finished] == [("SUCCEEDED", 1)] * 2
    assert left == []  # each stopped cleanly, leaving the worker list
    text = log_text(tmp_path)
    assert text.count("exited with code 0") == 2 and f"supervisor {process.pid} stopped" in text


@pytest.mark.integration
async def test_a_second_sigint_hurries_the_processes_and_their_tasks_go_back(
    settings: Settings, tmp_path: Path
) -> None:
    async with started(
        settings, tmp_path, "demo.sleep", "--concurrency", "1", TASKQ_WORKER_SHUTDOWN_GRACE="1h"
    ) as (h, process):
        task_id = await h.enqueue("demo.sleep", {"seconds": 3600})
        await h.wait_for(task_id, "RUNNING", timeout=DEADLINE)
        process.send_signal(signal.SIGINT)
        await wait_until_logged(tmp_path, "stopping: 1 tasks running")
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), DEADLINE) == 0
        row = await h.task(task_id)
    assert (row.status, row.attempts) == ("ENQUEUED", 0)  # given back, not counted


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "env", "code", "error"),
    [
        (["--queues", "nope"], {}, 2, "taskq: invalid --queues"),
        ([], {"TASKQ_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}, 1, "taskq: "),
    ],
    ids=["usage", "database-unreachable"],
)
async def test_a_process_that_cannot_start_stops_the_supervisor_at_once(
    settings: Settings, tmp_path: Path, args: list[str], env: dict[str, str], code: int, error: str
) -> None:
    async with harness(settings), supervisor(settings, tmp_path, *args, **env) as process:
        assert await asyncio.wait_for(process.wait(), DEADLINE) == code
    text = log_text(tmp_path)
    assert error in text
    assert f"exited with code {code} " in text and "stopping" in text
    assert text.count("started: pid") <= 2 and "restarting" not in text  # no restart loop


@pytest.mark.integration
async def test_a_module_that_does_not_import_fails_fast_with_its_error(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskq",
        "worker",
        "no_such_module",
        "--processes",
        "3",
        env=subprocess_env(),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    text = err.decode()
    assert process.returncode == 2, text
    assert "taskq: cannot import 'no_such_module'" in text
    assert "(usage or configuration): stopping" in text
    assert text.count("started: pid") <= 3 and "restarting" not in text


@pytest.mark.integration
async def test_the_processes_stop_when_the_supervisor_is_killed(
    settings: Settings, tmp_path: Path
) -> None:
    async with started(settings, tmp_path, "demo.sleep") as (h, process):
        pids = [pid_of(worker_id) for worker_id in await worker_ids(h)]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        task_id = await h.enqueue("demo.sleep", {"seconds": 1})
        await h.wait_for(task_id, "RUNNING", timeout=DEADLINE)
        process.kill()
        await process.wait()
        await poll(lambda: not any(alive(pid) for pid in pids), "gone")
        row = await h.task(task_id)
        left = await worker_ids(h)
    assert left == []  # they stopped gracefully, leaving the worker list
    assert row.status == "SUCCEEDED"  # within their shutdown grace
    assert "the supervisor is gone: stopping" in log_text(tmp_path)
