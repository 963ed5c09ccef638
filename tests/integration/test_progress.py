"""``ctx.progress`` through the real services: reports from async and sync handlers are
written in batches (the latest of each task, not every call), shown by ``GET
/tasks/{id}``; a bad report is an error in the handler and writes nothing."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from taskq.errors import InvalidRequest
from taskq.handlers import Context, Registry
from taskq.settings import Settings
from tests.support.api_fixtures import running_api
from tests.support.worker_fixtures import harness, running_worker, until

pytestmark = pytest.mark.integration

REPORTS = 1000


def handlers(gate: asyncio.Event, thread_gate: threading.Event) -> Registry:
    registry = Registry()

    @registry.task("progress.async", max_attempts=1)
    async def chatty(payload: dict[str, Any], ctx: Context) -> str:
        for n in range(REPORTS):
            await ctx.progress(n / REPORTS / 2, {"rows": n})
            await asyncio.sleep(0)  # the worker's loop runs between the reports
        await ctx.progress(0.5, {"rows": 500})
        await gate.wait()
        return "done"

    @registry.task("progress.sync", max_attempts=1)
    def blocking(payload: dict[str, Any], ctx: Context) -> str:
        ctx.progress(0.25)
        thread_gate.wait(60)
        ctx.progress(1, {"stage": "done"})
        return "done"

    @registry.task("progress.bad", max_attempts=1)
    async def bad(payload: dict[str, Any], ctx: Context) -> list[str]:
        try:
            await ctx.progress(1.5, {"rows": object()})
        except InvalidRequest as exc:
            return [e.field for e in exc.errors]
        return []

    return registry


async def test_progress_is_written_in_batches_and_shown(settings: Settings) -> None:
    gate, thread_gate = asyncio.Event(), threading.Event()
    async with (
        harness(settings) as h,
        running_worker(settings, handlers(gate, thread_gate)) as worker,
        running_api(settings, relay=False) as api,
    ):
        task_id = await h.enqueue("progress.async")
        await h.wait_for(task_id, "RUNNING")

        async def shown() -> Any:
            return (await api.get(f"/tasks/{task_id}")).json()["progress"]

        async def reported() -> bool:
            return (await shown() or {}).get("fraction") == 0.5

        await until(reported, "the progress was not shown")
        progress = await shown()
        assert progress["details"] == {"rows": 500} and progress["attempt"] == 1
        assert progress["at"]
        # 1,001 reports, written as the latest of each interval: a few rows at most.
        assert 1 <= worker.progress.rows_written <= 5
        gate.set()
        row = await h.wait_for(task_id, "SUCCEEDED")
        assert row.progress is not None and row.progress.fraction == 0.5


async def test_a_sync_handler_reports_from_its_thread(settings: Settings) -> None:
    settings = settings.model_copy(update={"progress_interval": 0.2})
    gate, thread_gate = asyncio.Event(), threading.Event()
    async with (
        harness(settings) as h,
        running_worker(settings, handlers(gate, thread_gate)),
    ):
        task_id = await h.enqueue("progress.sync")

        async def fraction() -> float | None:
            progress = (await h.task(task_id)).progress
            return None if progress is None else progress.fraction

        async def reported(value: float) -> bool:
            return await fraction() == value

        await until(lambda: reported(0.25), "the first report was not written")
        first = (await h.task(task_id)).progress
        assert first is not None and first.details is None
        thread_gate.set()
        await h.wait_for(task_id, "SUCCEEDED")
        # The last report is written after the handler returned, within an interval.
        await until(lambda: reported(1.0), "the last report was not written")
        last = (await h.task(task_id)).progress
        assert last is not None and last.details == '{"stage": "done"}'


async def test_a_bad_report_raises_in_the_handler_and_writes_nothing(
    settings: Settings,
) -> None:
    gate, thread_gate = asyncio.Event(), threading.Event()
    async with harness(settings) as h, running_worker(settings, handlers(gate, thread_gate)):
        task_id = await h.enqueue("progress.bad")
        row = await h.wait_for(task_id, "SUCCEEDED", "FAILED")
    assert row.result_value() == ["fraction", "details"]
    assert row.progress is None


async def test_progress_shows_up_within_the_interval_for_many_tasks(settings: Settings) -> None:
    """Many tasks' reports: each task's latest is written, several in a statement."""
    settings = settings.model_copy(update={"progress_interval": 0.2})
    registry = Registry()
    gate = asyncio.Event()

    @registry.task("progress.many", max_attempts=1)
    async def many(payload: dict[str, Any], ctx: Context) -> None:
        for n in range(10):
            await ctx.progress(n / 10, {"n": payload["n"]})
        await gate.wait()

    async with harness(settings) as h, running_worker(settings, registry) as worker:
        ids = [await h.enqueue("progress.many", {"n": n}) for n in range(20)]

        async def all_shown() -> bool:
            rows = [await h.task(task_id) for task_id in ids]
            return all(r.progress is not None and r.progress.fraction == 0.9 for r in rows)

        await until(all_shown, "the reports were not all written")
        # Each task reported ten times at once: one row each, whatever the timing.
        assert worker.progress.rows_written == 20
        assert worker.progress.writes <= 20
        gate.set()
        for task_id in ids:
            await h.wait_for(task_id, "SUCCEEDED")
