"""`taskq worker` as a real process: killed mid-task, stopped with SIGTERM, bad usage."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskq.model import TaskStatus
from taskq.settings import Settings
from tests.support.services import subprocess_env
from tests.support.worker_fixtures import harness, start_worker_process

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def json_log_lines(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for log in directory.glob("worker-*.log")
        for line in log.read_text().splitlines()
        if line.startswith("{")
    ]


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_a_killed_workers_task_is_recovered_and_succeeds_once(
    settings: Settings, tmp_path: Path
) -> None:
    lease = {"TASKQ_LEASE_SECONDS": "2"}
    async with harness(settings) as h:
        doomed = await start_worker_process(settings, tmp_path, **lease)
        try:
            await h.put_type("demo.sleep", timeout=60)
            task_id = await h.enqueue("demo.sleep", {"seconds": 1.5})
            first = await h.wait_for(task_id, "RUNNING", timeout=20)
            doomed.kill()  # SIGKILL: no shutdown, no give-back, no more heartbeats
            await doomed.wait()
        finally:
            await stop(doomed)
        survivor = await start_worker_process(settings, tmp_path, **lease)
        try:
            row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        finally:
            survivor.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(survivor.wait(), 20) == 0
        events = await h.events(task_id)
    assert row.attempts == 2
    assert row.worker_id != first.worker_id
    assert [e.status for e in events] == [
        "ENQUEUED", "RUNNING", "ENQUEUED", "RUNNING", "SUCCEEDED",
    ]  # fmt: skip
    recovery = events[2]
    assert recovery.error == f"lease expired: worker {first.worker_id} stopped heartbeating"
    assert [e.status for e in events].count(TaskStatus.SUCCEEDED) == 1


async def test_sigterm_lets_the_running_task_finish_and_exits_0(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    async with harness(settings) as h:
        process = await start_worker_process(
            settings, tmp_path, "--concurrency", "4", "--metrics-port", str(port)
        )
        try:
            await h.put_type("demo.sleep", timeout=60)
            await h.put_type("demo.record", timeout=60)
            task_id = await h.enqueue("demo.sleep", {"seconds": 1.5})
            recorded = await h.enqueue("demo.record")
            await h.wait_for(recorded, "SUCCEEDED", timeout=20)
            await h.wait_for(task_id, "RUNNING", timeout=20)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "taskq_tasks_in_flight 1.0" in metrics
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 20) == 0
        finally:
            await stop(process)
        row = await h.task(task_id)
        executions = await h.store.pool.fetch("SELECT task_id, attempt FROM demo_executions")
    assert (row.status, row.attempts, row.result) == ("SUCCEEDED", 1, '{"slept": 1.5}')
    assert [tuple(e) for e in executions] == [(recorded, 1)]
    lines = json_log_lines(tmp_path)
    messages = [line["message"] for line in lines]
    assert any(m.startswith("worker ") and m.endswith(" stopped") for m in messages)
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)


async def test_bad_usage_exits_2(settings: Settings, tmp_path: Path) -> None:
    for args in (
        ["no_such_module"],
        ["taskq.demo", "--queues", "nope"],
        ["taskq.demo", "--inline-window", "2s"],  # more than the 1 s allowed
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskq",
            "worker",
            *args,
            env=subprocess_env(settings),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        assert process.returncode == 2, err
        assert err.decode().startswith("taskq: ")
