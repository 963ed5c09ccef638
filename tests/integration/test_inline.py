"""Inline attempts against real Postgres and RabbitMQ (docs/workers.md, "Inline attempts").

A claim's transaction stays open for the inline window while its handlers start;
the successes within it are written in that transaction. Whether a RUNNING and a
SUCCEEDED event were written by one transaction is read from their ``xmin``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taskq.handlers import Context, Registry
from taskq.model import TaskStatus
from taskq.settings import Settings
from tests.support.crashing import CRASH_EXIT_CODE
from tests.support.worker_fixtures import harness, running_worker, start_worker_process

pytestmark = pytest.mark.integration

QUICK = 0.05  # seconds a quick handler takes: far inside a window of 1 s


async def transactions(
    db: asyncpg.Connection, settings: Settings, task_id: uuid.UUID
) -> list[tuple[str, str]]:
    """The task's events in order: (status, the id of the transaction that wrote it)."""
    rows = await db.fetch(
        f"SELECT status, xmin::text AS tx FROM {settings.db_schema}.task_events"
        " WHERE task_id = $1 ORDER BY id",
        task_id,
    )
    return [(row["status"], row["tx"]) for row in rows]


def quick_handlers() -> Registry:
    registry = Registry()

    @registry.task("quick.async")
    async def quick_async(payload: dict[str, Any], ctx: Context) -> dict[str, int]:
        await asyncio.sleep(QUICK)
        return {"attempt": ctx.attempt}

    @registry.task("quick.sync")
    def quick_sync(payload: dict[str, Any], ctx: Context) -> dict[str, int]:
        time.sleep(QUICK)
        return {"attempt": ctx.attempt}

    return registry


@pytest.mark.parametrize("task_type", ["quick.async", "quick.sync"])
async def test_a_quick_success_commits_with_its_claim_and_keeps_true_times(
    settings: Settings, db: asyncpg.Connection, task_type: str
) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, quick_handlers(), inline_window=1.0),
    ):
        task_id = await h.enqueue(task_type, {})
        row = await h.wait_for(task_id, "SUCCEEDED")
        events = await transactions(db, settings, task_id)
        history = await h.events(task_id)
    assert row.result == '{"attempt": 1}' and row.attempts == 1
    assert [status for status, _ in events] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
    assert events[1][1] == events[2][1]  # claim and outcome: one transaction
    # finished_at is the end of the handler, not the start of the claim's transaction.
    assert row.started_at is not None and row.finished_at is not None
    assert (row.finished_at - row.started_at).total_seconds() >= QUICK
    assert (history[2].at - history[1].at).total_seconds() >= QUICK


async def test_without_a_window_claim_and_outcome_commit_apart(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with harness(settings) as h, running_worker(settings, quick_handlers(), inline_window=0):
        task_id = await h.enqueue("quick.async", {})
        await h.wait_for(task_id, "SUCCEEDED")
        events = await transactions(db, settings, task_id)
    assert [status for status, _ in events] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
    assert events[1][1] != events[2][1]


async def test_a_handler_outliving_the_window_goes_on_under_the_heartbeat(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # A 2 s lease, a handler of 3 s: it succeeds only if the heartbeat extends the
    # lease of an attempt begun inline once its claim has committed (the sweeper
    # runs in this worker and would take the task back).
    settings = settings.model_copy(update={"lease_seconds": 2.0})
    registry = Registry()

    @registry.task("slow.async", timeout=60)
    async def slow(payload: dict[str, Any], ctx: Context) -> str:
        await asyncio.sleep(3.0)
        return "done"

    async with harness(settings) as h, running_worker(settings, registry, inline_window=0.05):
        task_id = await h.enqueue("slow.async", {})
        row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        events = await transactions(db, settings, task_id)
    assert row.attempts == 1 and row.result == '"done"'
    assert [status for status, _ in events] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
    assert events[1][1] != events[2][1]


async def test_a_retry_inside_the_window_is_recorded_after_the_commit(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(update={"backoff_strategy": "fixed", "backoff_fixed": 0.5})
    registry = Registry()

    @registry.task("flaky.async", max_attempts=3)
    async def flaky(payload: dict[str, Any], ctx: Context) -> int:
        if ctx.attempt == 1:
            raise ValueError("first attempt fails")
        return ctx.attempt

    async with harness(settings) as h, running_worker(settings, registry, inline_window=1.0):
        task_id = await h.enqueue("flaky.async", {})
        row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        events = await transactions(db, settings, task_id)
    assert row.attempts == 2 and row.result == "2"
    assert [status for status, _ in events] == [
        "ENQUEUED", "RUNNING", "ENQUEUED", "RUNNING", "SUCCEEDED",
    ]  # fmt: skip
    claim, retry, again, success = (tx for _, tx in events[1:])
    assert claim != retry  # the retry went through the recorder, after the commit
    assert again == success  # the second attempt, quick, committed with its claim


async def test_a_cancel_during_the_window_waits_for_the_commit_then_reaches_the_handler(
    settings: Settings,
) -> None:
    started = asyncio.Event()
    registry = Registry()

    @registry.task("patient.async", timeout=60)
    async def patient(payload: dict[str, Any], ctx: Context) -> str:
        started.set()
        await asyncio.wait_for(ctx.cancelled(), 30)
        return "stopped"

    async with harness(settings) as h, running_worker(settings, registry, inline_window=1.0):
        task_id = await h.enqueue("patient.async", {})
        await asyncio.wait_for(started.wait(), 20)  # inside the window: the claim is open
        status = await h.store.cancel(task_id, actor="test", reason="inline")
        row = await h.wait_for(task_id, "CANCELLED", timeout=30)
    # The cancel found the task RUNNING (it waited for the claim's commit), not ENQUEUED.
    assert status is TaskStatus.RUNNING
    assert row.attempts == 1


async def test_a_crash_inside_the_window_rolls_the_claim_back_and_the_redelivery_counts(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    seen: list[int] = []
    registry = Registry()

    @registry.task("crash.exit", max_attempts=3)
    async def survive(payload: dict[str, Any], ctx: Context) -> str:
        seen.append(ctx.attempt)
        return "survived"

    async with harness(settings) as h:
        await h.put_type("crash.exit", max_attempts=3)
        task_id = await h.enqueue("crash.exit", {})
        doomed = await start_worker_process(
            settings, tmp_path, "--inline-window", "1s", module="tests.support.crashing"
        )
        try:
            assert await asyncio.wait_for(doomed.wait(), 60) == CRASH_EXIT_CODE
        finally:
            if doomed.returncode is None:
                doomed.kill()
                await doomed.wait()
        # The claim rolled back with the process: the attempt never was.
        row = await h.task(task_id)
        assert (row.status, row.attempts, row.worker_id) == ("ENQUEUED", 0, None)
        assert [status for status, _ in await transactions(db, settings, task_id)] == ["ENQUEUED"]
        # RabbitMQ redelivers the envelope marked redelivered: it is claimed and
        # committed before its handler runs, so that run counts.
        async with running_worker(settings, registry, inline_window=1.0):
            row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
            events = await transactions(db, settings, task_id)
    assert seen == [1] and row.attempts == 1
    assert [status for status, _ in events] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
    assert events[1][1] != events[2][1]


async def test_a_window_runs_no_more_sync_handlers_than_threads_are_free(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # 20 quick sync tasks queued before the worker starts, so that its claims take
    # many at once; 2 threads. A window of 1 s would fit them all one after the
    # other, but only those with a thread free run in it: the rest start once
    # their claim has committed, as ordinary attempts.
    async with harness(settings) as h:
        await h.put_type("quick.sync")
        ids = [await h.enqueue("quick.sync", {"n": n}) for n in range(20)]
        async with running_worker(
            settings, quick_handlers(), concurrency=20, threads=2, inline_window=1.0
        ):
            for task_id in ids:
                await h.wait_for(task_id, "SUCCEEDED", timeout=60)
        claims: dict[str, list[str]] = {}  # claim transaction: its tasks' outcome transactions
        for task_id in ids:
            events = await transactions(db, settings, task_id)
            assert [status for status, _ in events] == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
            claims.setdefault(events[1][1], []).append(events[2][1])
    assert max(len(outcomes) for outcomes in claims.values()) > 2  # a claim took many
    inline = [sum(tx == claim for tx in outcomes) for claim, outcomes in claims.items()]
    assert max(inline) <= 2 and sum(inline) >= 1
