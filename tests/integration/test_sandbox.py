"""The handler sandbox: whatever a handler raises or returns, and however long it ignores
being stopped, its attempt ends with a reason and the worker lives on."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskq.handlers import Context, Registry
from taskq.settings import Settings
from tests.support.misbehaving import Custom
from tests.support.worker_fixtures import (
    Harness,
    abandoned_until,
    harness,
    metric,
    poll,
    running_worker,
    start_worker_process,
)

pytestmark = pytest.mark.integration

# What each handler raises, and the reason its attempts record.
RAISED: dict[str, tuple[Callable[[], BaseException], str]] = {
    "raise.custom": (lambda: Custom("mine"), "Custom: mine (raised inside the handler)"),
    "raise.cancelled": (
        asyncio.CancelledError,
        "CancelledError: the handler raised it itself; taskq did not cancel it",
    ),
    "raise.generator_exit": (GeneratorExit, "GeneratorExit: raised inside the handler"),
}


def raising() -> Registry:
    registry = Registry()
    for name, (error, _) in RAISED.items():

        async def handler(payload: dict[str, Any], ctx: Context, error: Any = error) -> None:
            raise error()

        registry.task(name, max_attempts=2, backoff=0)(handler)

    @registry.task("raise.custom_sync", max_attempts=2, backoff=0)
    def sync_handler(payload: dict[str, Any], ctx: Context) -> None:
        raise Custom("mine")

    @registry.task("raise.self_cancel", max_attempts=2, backoff=0)
    async def self_cancel(payload: dict[str, Any], ctx: Context) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # and returns: its asyncio task ends cancelled

    return registry


async def test_a_base_exception_fails_the_attempt_with_a_reason(settings: Settings) -> None:
    expected = {name: reason for name, (_, reason) in RAISED.items()}
    expected["raise.custom_sync"] = expected["raise.custom"]
    expected["raise.self_cancel"] = expected["raise.cancelled"]
    async with harness(settings) as h, running_worker(settings, raising()) as worker:
        ids = {name: await h.enqueue(name) for name in expected}
        for name, task_id in ids.items():
            row = await h.wait_for(task_id, "FAILED")
            assert (row.attempts, row.last_error) == (2, expected[name]), name
            retry = [e for e in await h.events(task_id) if e.status == "ENQUEUED"][-1]
            assert retry.error == expected[name]  # the first attempt was retried
        # Every attempt closed: the heartbeat extends no lease any more.
        await poll(lambda: not worker._runner.attempts, "attempts still held")
        assert metric(worker, "taskq_tasks_in_flight") == 0


async def test_a_worker_process_lives_on_after_sys_exit_and_stops_past_a_runaway(
    settings: Settings, tmp_path: Path
) -> None:
    async with harness(settings) as h:
        process = await start_worker_process(
            settings, tmp_path, module="tests.support.misbehaving", TASKQ_WORKER_SHUTDOWN_GRACE="1s"
        )
        try:
            await wait_for_types(h, "bad.exit")
            reasons = {
                "bad.exit": "SystemExit: the handler called sys.exit(3)",
                "bad.exit_sync": "SystemExit: the handler called sys.exit(4)",
                "bad.interrupt": "KeyboardInterrupt: raised inside the handler",
                "bad.base_exception": "Custom: a BaseException of its own (raised inside the"
                " handler)",
            }
            ids = {name: await h.enqueue(name) for name in reasons}
            for name, task_id in ids.items():
                row = await h.wait_for(task_id, "FAILED")
                assert row.last_error == reasons[name]
            assert (await h.wait_for(await h.enqueue("ok.noop"), "SUCCEEDED")).attempts == 1
            assert process.returncode is None

            # A handler that swallows every cancellation for 10 minutes cannot hold
            # the shutdown past the grace and the few seconds it gets to unwind.
            runaway = await h.enqueue("bad.swallow", {"seconds": 600})
            await h.wait_for(runaway, "RUNNING")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0
            row = await h.task(runaway)
            assert (row.status, row.attempts) == ("ENQUEUED", 0)  # given back
            assert row.last_error.startswith("given back by worker")
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert "abandoned" in worker_logs(tmp_path)


def worker_logs(tmp_path: Path) -> str:
    return "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))


def swallowing(release: asyncio.Event, started: asyncio.Event) -> Registry:
    registry = Registry()

    @registry.task("swallow.it", max_attempts=1, timeout=60)
    async def swallow(payload: dict[str, Any], ctx: Context) -> str:
        started.set()
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue
        return "finished anyway"

    return registry


@pytest.mark.parametrize("stop", ["timeout", "cancel", "shutdown"])
async def test_a_handler_that_swallows_cancellation_is_abandoned(
    settings: Settings, stop: str
) -> None:
    settings = settings.model_copy(update={"lease_seconds": 3.0})  # a heartbeat a second
    release, started = asyncio.Event(), asyncio.Event()
    registry = swallowing(release, started)
    options = {"cancel_grace": 0.5, "abandon_after": 0.5}
    try:
        async with harness(settings) as h, running_worker(settings, registry, **options) as worker:
            task_id = await h.enqueue("swallow.it", timeout=0.5 if stop == "timeout" else None)
            await asyncio.wait_for(started.wait(), 15)
            if stop == "timeout":
                row = await h.wait_for(task_id, "FAILED")
                assert row.last_error == "TimeoutError: the handler exceeded its timeout of 0.5s"
            elif stop == "cancel":
                await h.store.cancel(task_id, actor="test", reason="stop it")
                row = await h.wait_for(task_id, "CANCELLED")
                assert row.last_error.startswith("Cancelled: the handler was stopped")
            else:
                await asyncio.wait_for(worker.stop(0.3), 30)
                row = await h.task(task_id)
                assert (row.status, row.attempts) == ("ENQUEUED", 0)
                assert worker.runaways() == 1
            await abandoned_until(worker, "task", release.set)
    finally:
        release.set()


async def wait_for_types(h: Harness, name: str) -> None:
    """Wait until a worker process has registered its task types."""
    for _ in range(600):
        if any(task_type.name == name for task_type in await h.store.task_types()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"task type {name} never registered")
