"""Sync handlers run in the worker's threads: past the lease, several at once, with a
working context; over their timeout their thread is abandoned and replaced. Results
that cannot be stored fail the task at once."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from taskq.handlers import Context, Registry
from taskq.settings import Settings
from tests.support.worker_fixtures import abandoned_until, harness, poll, running_worker

pytestmark = pytest.mark.integration


def together(barrier: threading.Barrier, seconds: float) -> Registry:
    registry = Registry()

    @registry.task("sync.together", timeout=60, max_attempts=1)
    def wait_for_the_others(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ctx.log.info("waiting for the others")
        barrier.wait()  # all of them run at once, or this raises after the barrier's timeout
        time.sleep(seconds)  # longer than the lease: the event loop heartbeats meanwhile
        return {"thread": threading.current_thread().name, "cancel": ctx.cancel_requested}

    return registry


async def test_sync_handlers_run_at_once_in_threads_past_their_lease(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(update={"lease_seconds": 2.0})
    registry = together(threading.Barrier(3, timeout=30), seconds=3.5)
    with caplog.at_level(logging.INFO, logger="taskq.task"):
        async with harness(settings) as h, running_worker(settings, registry):
            ids = [await h.enqueue("sync.together") for _ in range(3)]
            rows = [await h.wait_for(task_id, "SUCCEEDED", "FAILED") for task_id in ids]
            events = [await h.events(task_id) for task_id in ids]
    for row, history in zip(rows, events, strict=True):
        assert (row.status, row.attempts) == ("SUCCEEDED", 1), row.last_error
        assert [e.status for e in history] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
        assert row.finished_at is not None and row.started_at is not None
        assert row.finished_at - row.started_at > timedelta(seconds=settings.lease_seconds)
    results = []
    for row in rows:
        assert row.result is not None
        results.append(json.loads(row.result))
    assert len({r["thread"] for r in results}) == 3
    assert all(r["thread"].startswith("taskq-handler") and r["cancel"] is False for r in results)
    logged = [r for r in caplog.records if r.getMessage() == "waiting for the others"]
    assert sorted(r.task_id for r in logged) == sorted(str(i) for i in ids)  # type: ignore[attr-defined]


def stuck_and_quick(stuck: threading.Event) -> Registry:
    registry = Registry()

    @registry.task("sync.stuck", timeout=0.5, max_attempts=1)
    def wait_for_ever(payload: dict[str, Any], ctx: Context) -> str:
        stuck.wait(60)
        return "late"

    @registry.task("sync.quick")
    def quick(payload: dict[str, Any], ctx: Context) -> str:
        return "quick"

    return registry


async def test_a_sync_handler_over_its_timeout_is_abandoned_and_replaced(
    settings: Settings,
) -> None:
    stuck = threading.Event()
    try:
        async with (
            harness(settings) as h,
            running_worker(settings, stuck_and_quick(stuck), threads=1) as worker,
        ):
            row = await h.wait_for(await h.enqueue("sync.stuck"), "FAILED")
            assert row.last_error == "TimeoutError: the handler exceeded its timeout of 0.5s"
            # The pool's one place went to a new thread: the next sync task runs.
            row = await h.wait_for(await h.enqueue("sync.quick"), "SUCCEEDED")
            assert row.result == '"quick"'
            await abandoned_until(worker, "thread", stuck.set)
    finally:
        stuck.set()


def polite(started: threading.Event) -> Registry:
    registry = Registry()

    @registry.task("sync.polite", timeout=60)
    def until_cancelled(payload: dict[str, Any], ctx: Context) -> str:
        started.set()
        return "stopped early" if ctx.wait_cancelled(60) else "never told"

    return registry


async def test_a_sync_handler_learns_of_a_cancel_in_its_thread(settings: Settings) -> None:
    settings = settings.model_copy(update={"lease_seconds": 3.0})  # a heartbeat a second
    started = threading.Event()
    async with harness(settings) as h, running_worker(settings, polite(started)):
        task_id = await h.enqueue("sync.polite")
        await poll(started.is_set, "the handler never started")
        await h.store.cancel(task_id, actor="test", reason="stop it")
        row = await h.wait_for(task_id, "CANCELLED")
        assert row.result == '"stopped early"'
        assert row.last_error.startswith("Cancelled: the handler returned")


def results() -> Registry:
    registry = Registry()

    @registry.task("result.big", max_attempts=3)
    async def big(payload: dict[str, Any], ctx: Context) -> str:
        return "x" * 2000

    @registry.task("result.big_sync", max_attempts=3)
    def big_sync(payload: dict[str, Any], ctx: Context) -> str:
        return "x" * 2000

    @registry.task("result.fits", max_attempts=3)
    def fits(payload: dict[str, Any], ctx: Context) -> str:
        return "x" * 990

    async def later(payload: dict[str, Any], ctx: Context) -> str:
        return "never"

    @registry.task("result.awaitable", max_attempts=3)
    def awaitable(payload: dict[str, Any], ctx: Context) -> Any:
        return later(payload, ctx)  # a plain function returning a coroutine

    return registry


async def test_results_that_cannot_be_stored_fail_the_task_at_once(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_result_bytes": 1000})
    too_big = (
        "InvalidResult: the result is 2,002 bytes of JSON, more than TASKQ_MAX_RESULT_BYTES (1,000)"
    )
    async with harness(settings) as h, running_worker(settings, results()):
        names = ("big", "big_sync", "fits", "awaitable")
        ids = {name: await h.enqueue(f"result.{name}") for name in names}
        rows = {name: await h.wait_for(ids[name], "SUCCEEDED", "FAILED") for name in names}
    fits = rows["fits"]
    assert fits.result is not None
    assert (fits.status, len(fits.result)) == ("SUCCEEDED", 992)
    for name in ("big", "big_sync", "awaitable"):
        assert (rows[name].status, rows[name].attempts) == ("FAILED", 1), name
    assert rows["big"].last_error == rows["big_sync"].last_error == too_big
    assert rows["awaitable"].last_error == (
        "HandlerError: the handler of 'result.awaitable' is a plain function but returned"
        " coroutine, an awaitable: declare it with async def"
    )


def one_at_a_time(spans: list[tuple[float, float]]) -> Registry:
    registry = Registry()

    @registry.task("sync.slow", timeout=5)
    def slow(payload: dict[str, Any], ctx: Context) -> None:
        start = time.monotonic()
        time.sleep(2)
        spans.append((start, time.monotonic()))

    return registry


async def test_a_sync_handler_waits_for_a_thread_and_its_timeout_starts_then(
    settings: Settings,
) -> None:
    spans: list[tuple[float, float]] = []
    async with harness(settings) as h, running_worker(settings, one_at_a_time(spans), threads=1):
        ids = [await h.enqueue("sync.slow") for _ in range(3)]
        rows = [await h.wait_for(task_id, "SUCCEEDED", "FAILED") for task_id in ids]
    # Claimed at once, run one after the other in the one thread: the last waited
    # 4 s for it, and its timeout of 5 s counted only the 2 s it ran.
    assert [row.status for row in rows] == ["SUCCEEDED"] * 3, [r.last_error for r in rows]
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
