"""GET /stream on a real HTTP server: stats every second, task events and progress reports
as they happen, auth."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from taskq.handlers import Context, Registry
from taskq.settings import Settings
from taskq.web.api import create_app
from tests.support.api_fixtures import JSON, declare_topology
from tests.support.worker_fixtures import harness, running_worker

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The API on a real uvicorn server in this process; its base URL."""
    port = free_port()
    app = create_app(settings, relay=False)
    server = uvicorn.Server(uvicorn.Config(app, port=port, lifespan="on", log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.stopping.set()
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event or "message", json.loads(line.removeprefix("data: "))


async def test_stream_sends_stats_and_task_events(settings: Settings) -> None:
    settings = settings.model_copy(update={"api_keys": ["secret"]})
    await declare_topology(settings)
    key = {"Authorization": "Bearer secret"}
    async with serving(settings) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        refused = await http.get("/stream")
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        await http.put("/types/s.v1", json={}, headers=key)
        async with http.stream("GET", "/stream", headers=key) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            seen: list[tuple[str, Any]] = []
            task_id = None
            async with asyncio.timeout(20):
                async for event, data in events(response):
                    seen.append((event, data))
                    if event == "stats" and task_id is None:
                        assert set(data) >= {"by_status", "broker", "throughput", "latency"}
                        created = await http.post(
                            "/enqueue", json={"type": "s.v1", "payload": {}}, headers=key
                        )
                        task_id = created.json()["id"]
                        await http.post(f"/tasks/{task_id}/cancel", headers={**key, **JSON})
                    if event == "task" and data["status"] == "CANCELLED":
                        break
            tasks = [data for event, data in seen if event == "task"]
            assert [(t["id"], t["status"]) for t in tasks] == [
                (task_id, "ENQUEUED"), (task_id, "CANCELLED"),
            ]  # fmt: skip
            assert tasks[0]["type"] == "s.v1" and tasks[0]["queue"] == "default"
            assert set(tasks[0]) == {"id", "type", "queue", "status", "attempt", "at"}
            stats = [data for event, data in seen if event == "stats"]
            assert stats and stats[0]["broker"]["available"] is True
        # The client left; the server notices and still stops promptly (serving's exit).


async def test_open_streams_end_when_the_server_stops(settings: Settings) -> None:
    """The CLI's server tells the app it stops, so open streams do not hold the shutdown."""
    from taskq.cli import _server_class

    await declare_topology(settings)
    port = free_port()
    app = create_app(settings, relay=False)
    server = _server_class()(uvicorn.Config(app, port=port, lifespan="on", log_config=None))
    server.stopping = app.state.stopping
    # As in taskq.cli: uvicorn re-raises the signal it stopped for; let it land softly.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    serve = asyncio.create_task(server.serve())
    try:
        await stream_until_stopped(server, port)
        await asyncio.wait_for(serve, 10)
    finally:
        signal.signal(signal.SIGTERM, previous)


async def stream_until_stopped(server: Any, port: int) -> None:
    while not server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
        http.stream("GET", "/stream") as response,
    ):
        stream = events(response)
        event, _ = await anext(stream)
        assert event == "stats"
        server.handle_exit(signal.SIGTERM, None)
        async with asyncio.timeout(10):
            async for _ in stream:
                pass  # the stream ends instead of running on


async def test_streams_are_capped_and_share_one_poller(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_streams": 2})
    await declare_topology(settings)

    def pollers() -> int:
        return sum(t.get_name() == "taskq-stream-poller" for t in asyncio.all_tasks())

    async with serving(settings) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        async with http.stream("GET", "/stream") as first, http.stream("GET", "/stream") as second:
            streams = [events(first), events(second)]
            for stream in streams:
                assert (await anext(stream))[0] == "stats"
            refused = await http.get("/stream")
            assert refused.status_code == 429 and refused.headers["retry-after"]
            assert refused.json()["title"] == "Too many streams"
            assert pollers() == 1
            await http.put("/types/s.v1", json={})
            created = await http.post("/enqueue", json={"type": "s.v1", "payload": {}})
            for stream in streams:
                async with asyncio.timeout(20):
                    async for event, data in stream:
                        if event == "task":
                            assert data["id"] == created.json()["id"]
                            break
        # Both closed: the poller stops, and starts again for the next stream.
        async with asyncio.timeout(10):
            while pollers():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        async with http.stream("GET", "/stream") as third:
            assert (await anext(events(third)))[0] == "stats"
            assert pollers() == 1


async def test_stream_sends_progress_reports(settings: Settings) -> None:
    settings = settings.model_copy(update={"progress_interval": 0.1})
    registry = Registry()
    gate = asyncio.Event()

    @registry.task("s.progress", max_attempts=1)
    async def report(payload: dict[str, Any], ctx: Context) -> None:
        await ctx.progress(0.3, {"rows": 3})
        await gate.wait()
        await ctx.progress(0.9)

    async with (
        serving(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        harness(settings) as h,
        running_worker(settings, registry),
        http.stream("GET", "/stream") as response,
    ):
        reports = []
        task_id = None
        async with asyncio.timeout(30):
            async for event, data in events(response):
                if event == "stats" and task_id is None:
                    task_id = str(await h.enqueue("s.progress"))
                if event == "progress" and data["id"] == task_id:
                    reports.append(data)
                    if data["fraction"] == 0.3:
                        gate.set()
                    else:
                        break
        assert [(r["fraction"], r["details"]) for r in reports] == [(0.3, {"rows": 3}), (0.9, None)]
        assert set(reports[0]) == {"id", "type", "queue", "attempt", "fraction", "details", "at"}
        assert (reports[0]["type"], reports[0]["attempt"]) == ("s.progress", 1)
