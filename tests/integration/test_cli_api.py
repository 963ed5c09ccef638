"""The `taskq api`, `taskq enqueue`, `taskq types`, `taskq schedules` and `taskq limits`
commands as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from taskq.fleet.schedules import schedule_spec
from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology
from tests.support.services import run_taskq, subprocess_env
from tests.support.worker_fixtures import harness

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


run = run_taskq


async def test_api_process_serves_and_stops_cleanly(settings: Settings, tmp_path: Path) -> None:
    await declare_topology(settings)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskq",
        "api",
        "--port",
        str(port),
        env=subprocess_env(settings),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                try:
                    health = await http.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert health.json()["status"] == "ok"
            response = await http.put("/types/demo.echo", json={"queue": "high"})
            assert response.status_code == 201

            code, out, err = await run(settings, tmp_path, "enqueue", "demo.echo", '{"a": 1}')
            assert code == 0, err
            task = json.loads(out)
            assert task["queue"] == "high" and task["replayed"] is False
            fetched = (await http.get(f"/tasks/{task['id']}")).json()
            assert fetched["payload"] == {"a": 1}

            code, out, err = await run(settings, tmp_path, "types")
            assert code == 0 and "demo.echo" in out and "queue=high" in out

            unique = ["--unique", '{"key": "$.a"}']
            code, out, err = await run(
                settings, tmp_path, "enqueue", "demo.echo", '{"a": 1}', *unique
            )
            first = json.loads(out)
            code, out, err = await run(
                settings, tmp_path, "enqueue", "demo.echo", '{"a": 1}', *unique
            )
            assert code == 0, err
            again = json.loads(out)
            assert again["id"] == first["id"] and again["duplicate"] is True
            assert again["replayed"] is False
            code, out, err = await run(settings, tmp_path, "types", "pause", "demo.echo")
            assert code == 0 and "demo.echo paused" in out, err
            assert (await http.get("/types/demo.echo")).json()["paused"] is True
            code, out, err = await run(settings, tmp_path, "types")
            assert code == 0 and "paused" in out
            code, out, err = await run(settings, tmp_path, "types", "resume", "demo.echo")
            assert code == 0 and "demo.echo resumed" in out, err
            assert (await http.get("/types/demo.echo")).json()["paused"] is False
            code, out, err = await run(settings, tmp_path, "types", "pause", "demo.nope")
            assert code == 1 and "no task type" in err
            code, out, err = await run(settings, tmp_path, "types", "pause")
            assert code == 2 and "needs the type's name" in err

            code, out, err = await run(settings, tmp_path, "enqueue", "demo.echo", "{nope")
            assert code == 2 and "not JSON" in err
            code, out, err = await run(settings, tmp_path, "enqueue", "demo.nope", "{}")
            assert code == 1 and "unknown task type" in err and "Traceback" not in err
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, output.decode()


async def test_run_starts_the_whole_system_and_stops_on_ctrl_c(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskq",
        "run",
        env=subprocess_env(settings, TASKQ_HTTP_PORT=str(port)),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches the whole process group
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                try:
                    if (await http.get("/types/demo.echo")).status_code == 200:
                        break  # the API is up and the worker registered its types
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            response = await http.post("/enqueue", json={"type": "demo.echo", "payload": {"a": 1}})
            assert response.status_code == 201, response.text
            task_id = response.json()["id"]
            for _ in range(200):
                task = (await http.get(f"/tasks/{task_id}")).json()
                if task["status"] == "SUCCEEDED":
                    break
                await asyncio.sleep(0.05)
            assert task["status"] == "SUCCEEDED" and task["result"] == {"a": 1}
    finally:
        os.killpg(process.pid, signal.SIGINT)
        output, _ = await asyncio.wait_for(process.communicate(), 40)
    assert process.returncode == 0, output.decode()[-3000:]


async def test_schedules_command(settings: Settings, tmp_path: Path) -> None:
    await declare_topology(settings)
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        spec, _ = schedule_spec("pulse", {"every": 3600, "type": "demo.echo"})
        await h.store.put_schedule(spec, await h.store.database_now(), max_schedules=10)

        code, out, err = await run(settings, tmp_path, "schedules")
        assert code == 0, err
        assert "pulse" in out and "every 3600s" in out and "fires=0" in out
        code, out, err = await run(settings, tmp_path, "schedules", "pause", "pulse")
        assert code == 0, err
        assert "paused" in (await run(settings, tmp_path, "schedules", "list"))[1]
        code, out, err = await run(settings, tmp_path, "schedules", "trigger", "pulse")
        assert code == 0 and out.startswith("enqueued task "), err
        [envelope] = await h.take(h.names.queue("default"), 1, 5)
        assert out.split()[-1] == envelope.message_id
        code, out, err = await run(settings, tmp_path, "schedules", "resume", "pulse")
        assert code == 0, err
        code, out, err = await run(settings, tmp_path, "schedules", "delete", "pulse")
        assert code == 0, err
        code, out, err = await run(settings, tmp_path, "schedules", "delete", "pulse")
        assert code == 1 and "no schedule 'pulse'" in err
        code, out, err = await run(settings, tmp_path, "schedules", "pause")
        assert code == 2 and "needs the schedule's name" in err
        assert (await run(settings, tmp_path, "schedules"))[1].startswith("no schedules")


async def test_limits_command(settings: Settings, tmp_path: Path) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        assert (await run(settings, tmp_path, "limits"))[1].startswith("no rate limiters")
        code, out, err = await run(
            settings, tmp_path, "limits", "set", "stripe", "--limit", "100", "--per", "1m",
            "--key", "customer",
        )  # fmt: skip
        assert code == 0 and "created rate limiter stripe" in out, err
        await h.store.set_type_rate_limits([("demo.echo", "stripe")], "api")
        code, out, err = await run(settings, tmp_path, "limits")
        assert code == 0 and "stripe" in out and "100/60s" in out and "key=customer" in out, err
        assert "types=demo.echo" in out
        assert "rate_limit=stripe" in (await run(settings, tmp_path, "types"))[1]
        code, out, err = await run(settings, tmp_path, "limits", "delete", "stripe")
        assert code == 1 and "used by task types demo.echo" in err
        await h.store.set_type_rate_limits([("demo.echo", None)], "api")
        code, out, err = await run(settings, tmp_path, "limits", "delete", "stripe")
        assert code == 0, err
        code, out, err = await run(settings, tmp_path, "limits", "delete", "stripe")
        assert code == 1 and "no rate limiter 'stripe'" in err
        code, out, err = await run(settings, tmp_path, "limits", "set", "x", "--limit", "0")
        assert code == 2 and "--limit" in err
        code, out, err = await run(settings, tmp_path, "limits", "delete")
        assert code == 2 and "needs the limiter's name" in err
