"""The worker's delivery protocol against real Postgres and RabbitMQ: claim, run, record,
retry through the delay levels, dead-letter, time out, give back, and refuse stale outcomes."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest

from taskq.amqp.envelope import Envelope
from taskq.backoff import FixedBackoff
from taskq.fleet.relay import HEADER_ATTEMPTS, HEADER_ORIGIN, HEADER_REASON
from taskq.handlers import Context, Registry
from taskq.model import ClaimedTask
from taskq.settings import Settings
from taskq.store import NewTask
from taskq.worker import sandbox
from tests.support.worker_fixtures import harness, metric, running_worker

pytestmark = pytest.mark.integration


def fixed_backoff(settings: Settings, seconds: float) -> Settings:
    return settings.model_copy(update={"backoff_strategy": "fixed", "backoff_fixed": seconds})


def statuses(events: list[Any]) -> list[str]:
    return [event.status for event in events]


async def test_success_records_the_result_and_the_events(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings) as worker:
        task_id = await h.enqueue("demo.echo", {"hello": "world"})
        row = await h.wait_for(task_id, "SUCCEEDED")
        assert row.result == '{"hello": "world"}'
        assert (row.attempts, row.worker_id) == (1, worker.worker_id)
        assert row.lease_expires_at is None and row.finished_at is not None
        assert statuses(await h.events(task_id)) == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
        labels = {"type": "demo.echo", "queue": "default", "outcome": "succeeded"}
        assert metric(worker, "taskq_tasks_processed_total", **labels) == 1
        assert metric(worker, "taskq_task_duration_seconds_count", type="demo.echo") == 1
        assert metric(worker, "taskq_task_queue_wait_seconds_count", queue="default") == 1
        assert metric(worker, "taskq_tasks_in_flight") == 0


async def test_failures_retry_after_the_backoff_then_succeed(settings: Settings) -> None:
    settings = fixed_backoff(settings, 1.0)
    async with harness(settings) as h, running_worker(settings) as worker:
        task_id = await h.enqueue("demo.fail", {"times": 2})
        row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        assert row.attempts == 3
        assert row.result == '{"succeeded_on_attempt": 3}'
        events = await h.events(task_id)
        assert statuses(events) == [
            "ENQUEUED", "RUNNING", "ENQUEUED", "RUNNING", "ENQUEUED", "RUNNING", "SUCCEEDED",
        ]  # fmt: skip
        retries = [e for e in events if e.status == "ENQUEUED" and e.previous_status]
        assert [e.error for e in retries] == [
            "DemoFailure: demo failure on attempt 1",
            "DemoFailure: demo failure on attempt 2",
        ]
        for retry in retries:
            following = next(e for e in events if e.id > retry.id)
            assert following.status == "RUNNING"
            # The backoff (1 s) runs from the retry statement's start; the event's
            # `at` is read later in it, so the two differ by the statement's time.
            assert retry.run_at is not None
            assert retry.run_at - retry.at >= timedelta(seconds=0.9)
            assert following.at >= retry.run_at
        assert metric(worker, "taskq_task_retries_total", type="demo.fail", queue="default") == 2


async def test_always_failing_ends_failed_and_dead_lettered(settings: Settings) -> None:
    settings = fixed_backoff(settings, 1.0)
    async with harness(settings) as h, running_worker(settings) as worker:
        task_id = await h.enqueue("demo.fail", {}, max_attempts=3)
        row = await h.wait_for(task_id, "FAILED", timeout=30)
        assert row.attempts == 3
        assert row.last_error == "DemoFailure: demo failure on attempt 3"
        assert statuses(await h.events(task_id))[-2:] == ["RUNNING", "FAILED"]
        [letter] = await h.dead_letters(1)
        assert letter.message_id == str(task_id)
        assert letter.type == "demo.fail"
        assert letter.headers[HEADER_REASON] == "DemoFailure: demo failure on attempt 3"
        assert letter.headers[HEADER_ATTEMPTS] == 3
        assert letter.headers[HEADER_ORIGIN] == "default"
        assert Envelope.parse(letter.body).id == task_id
        assert metric(worker, "taskq_dead_lettered_total", queue="default", reason="failed") == 1
        # The DLQ publish is confirmed and then recorded (in a batch): nothing stays owed.
        for _ in range(100):
            if (await h.task(task_id)).published_at is not None:
                break
            await asyncio.sleep(0.05)
        assert (await h.task(task_id)).published_at is not None


async def test_fail_ends_the_task_at_once(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings):
        task_id = await h.enqueue("demo.fail", {"fatal": True})
        row = await h.wait_for(task_id, "FAILED")
        assert row.attempts == 1
        assert row.last_error == "Fail: demo.fail was asked to fail for good"
        [letter] = await h.dead_letters(1)
        assert letter.headers[HEADER_REASON] == row.last_error


def slow_then_fast(cancelled: list[int]) -> Registry:
    registry = Registry()

    @registry.task("test.slow", timeout=0.3, max_attempts=3, backoff=FixedBackoff(0))
    async def slow(payload: dict[str, Any], ctx: Context) -> str:
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(ctx.attempt)
                raise
        return "fast"

    return registry


async def test_a_handler_over_its_timeout_is_cancelled_and_retried(settings: Settings) -> None:
    cancelled: list[int] = []
    async with harness(settings) as h, running_worker(settings, slow_then_fast(cancelled)):
        task_id = await h.enqueue("test.slow")
        row = await h.wait_for(task_id, "SUCCEEDED", timeout=15)
        assert (row.attempts, row.result) == (2, '"fast"')
        assert cancelled == [1]
        retry = (await h.events(task_id))[2]
        assert retry.status == "ENQUEUED"
        assert retry.error == "TimeoutError: the handler exceeded its timeout of 0.3s"


def blocking(release: asyncio.Event) -> Registry:
    registry = Registry()

    @registry.task("test.block")
    async def block(payload: dict[str, Any], ctx: Context) -> str:
        await release.wait()
        return ctx.worker_id

    return registry


async def test_a_stale_worker_cannot_record_an_outcome(settings: Settings) -> None:
    release = asyncio.Event()
    async with harness(settings) as h, running_worker(settings, blocking(release)) as stale:
        task_id = await h.enqueue("test.block")
        await h.wait_for(task_id, "RUNNING")
        token = await h.store.pool.fetchval("SELECT claim_token FROM tasks WHERE id = $1", task_id)
        # Its lease expires (the heartbeat stalled) and another worker takes the task over.
        await h.store.pool.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            task_id,
        )
        [claim] = await h.store.claim([task_id], "worker-b", 30.0)
        assert isinstance(claim, ClaimedTask) and claim.attempts == 2

        release.set()  # the stale worker's handler finishes and tries to record success
        labels = {"type": "test.block", "queue": "default", "outcome": "stale"}
        for _ in range(100):
            if metric(stale, "taskq_tasks_processed_total", **labels):
                break
            await asyncio.sleep(0.05)
        assert metric(stale, "taskq_tasks_processed_total", **labels) == 1
        row = await h.task(task_id)
        assert (row.status, row.attempts, row.worker_id) == ("RUNNING", 2, "worker-b")
        assert row.result is None
        # The stale worker cannot fail or retry it either.
        assert await h.store.fail([(task_id, token, "late")]) == []
        assert await h.store.retry([(task_id, token, "late", 0.0)]) == []
        recorded = await h.store.complete([(task_id, claim.claim_token, '"b"')])
        assert recorded == {task_id: "SUCCEEDED"}
        row = await h.task(task_id)
        assert (row.status, row.result) == ("SUCCEEDED", '"b"')
        assert statuses(await h.events(task_id)).count("SUCCEEDED") == 1


async def test_a_type_without_a_handler_retries_then_fails_with_a_reason(
    settings: Settings,
) -> None:
    async with harness(settings) as h, running_worker(settings) as worker:
        await h.put_type("other.v1", max_attempts=2, backoff={"strategy": "fixed", "delay": 0})
        # The worker reads type backoffs every few seconds; this one is new to it.
        await worker._register_types()
        task_id = await h.enqueue("other.v1")
        row = await h.wait_for(task_id, "FAILED", timeout=15)
        assert row.attempts == 2
        assert (
            row.last_error
            == f"NoHandler: no handler for task type 'other.v1' on {worker.worker_id}"
        )
        [letter] = await h.dead_letters(1)
        assert letter.message_id == str(task_id)


async def test_graceful_stop_gives_back_what_outlives_the_grace(settings: Settings) -> None:
    settings = settings.model_copy(update={"worker_shutdown_grace": 0.3})
    async with harness(settings) as h:
        async with running_worker(settings) as first:
            task_id = await h.enqueue("demo.sleep", {"seconds": 1.5})
            await h.wait_for(task_id, "RUNNING")
            await first.stop(0.3)  # stopping again on leaving the block is a no-op
            row = await h.task(task_id)
            assert (row.status, row.attempts) == ("ENQUEUED", 0)
            assert row.last_error.startswith("given back by worker")
            assert row.published_at is not None  # published again after the commit
            labels = {"type": "demo.sleep", "queue": "default", "outcome": "given_back"}
            assert metric(first, "taskq_tasks_processed_total", **labels) == 1
        async with running_worker(settings) as second:
            row = await h.wait_for(task_id, "SUCCEEDED", timeout=15)
            assert (row.attempts, row.worker_id) == (1, second.worker_id)


async def test_an_early_delivery_goes_back_through_the_delay_levels(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings) as worker:
        # Due in 2 s, but its envelope arrives now (as after a broker-side replay).
        task_id = uuid.uuid4()
        [result] = await h.store.enqueue([NewTask(task_id, "demo.echo", json.dumps({}), delay=2)])
        await h.publisher.publish(Envelope(task_id, "demo.echo", 0), "default")
        row = await h.wait_for(task_id, "SUCCEEDED", timeout=15)
        assert row.started_at is not None
        assert row.started_at >= row.run_at
        # Back through the delay levels for the whole seconds (less a margin), then
        # held for the rest: decided early twice at most.
        early = metric(worker, "taskq_deliveries_total", queue="default", decision="early")
        assert 1 <= early <= 2
        assert statuses(await h.events(task_id)) == ["ENQUEUED", "RUNNING", "SUCCEEDED"]
        assert result.delay > 1


async def test_exhausted_and_duplicate_deliveries(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings) as worker:
        # A task with no attempt left that is still ENQUEUED: the claim fails it.
        exhausted = await h.enqueue("demo.echo", max_attempts=1)
        await h.wait_for(exhausted, "SUCCEEDED")
        await h.store.pool.execute(
            "UPDATE tasks SET status = 'ENQUEUED', last_error = 'boom', finished_at = NULL"
            " WHERE id = $1",
            exhausted,
        )
        await h.publisher.publish(Envelope(exhausted, "demo.echo", 1), "default")
        row = await h.wait_for(exhausted, "FAILED")
        assert row.attempts == 1
        [letter] = await h.dead_letters(1)
        assert (letter.message_id, letter.headers[HEADER_REASON]) == (str(exhausted), "boom")

        # Two deliveries of a running task: the second is dropped, it runs once.
        sleeper = await h.enqueue("demo.sleep", {"seconds": 0.5})
        await h.wait_for(sleeper, "RUNNING")
        await h.publisher.publish(Envelope(sleeper, "demo.sleep", 0), "default")
        await h.wait_for(sleeper, "SUCCEEDED")
        assert statuses(await h.events(sleeper)).count("RUNNING") == 1
        assert metric(worker, "taskq_deliveries_total", queue="default", decision="duplicate") == 1


def awkward() -> Registry:
    registry = Registry()

    @registry.task("test.unjsonable", max_attempts=3)
    async def unjsonable(payload: dict[str, Any], ctx: Context) -> object:
        return {"value": object()}

    @registry.task("test.nul_result", max_attempts=3)
    async def nul_result(payload: dict[str, Any], ctx: Context) -> str:
        return "a\x00b"

    @registry.task("test.nul_error", max_attempts=1)
    async def nul_error(payload: dict[str, Any], ctx: Context) -> None:
        raise RuntimeError("bad\x00byte \udcff" + "x" * 5000)

    @registry.task("test.fine")
    async def fine(payload: dict[str, Any], ctx: Context) -> str:
        return "\\u0000 is fine as text"

    return registry


async def test_results_and_errors_postgres_cannot_store_fail_cleanly(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings, awkward()):
        names = ("unjsonable", "nul_result", "nul_error", "fine")
        ids = {name: await h.enqueue(f"test.{name}") for name in names}
        rows = {name: await h.wait_for(ids[name], "FAILED", "SUCCEEDED") for name in names}
    assert rows["fine"].result == '"\\\\u0000 is fine as text"'
    # Another attempt would return the same: the task fails at once.
    assert rows["unjsonable"].attempts == rows["nul_result"].attempts == 1
    assert rows["unjsonable"].last_error == (
        "InvalidResult: the result is not JSON: Type is not JSON serializable: object"
    )
    assert rows["nul_result"].last_error == (
        "InvalidResult: the result contains a NUL character (\\u0000), which Postgres cannot store"
    )
    error = rows["nul_error"].last_error
    assert error is not None
    assert error.startswith("RuntimeError: bad\\0byte ?xxx") and len(error) == 2000


async def test_a_result_the_database_refuses_fails_the_task_and_spares_the_batch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the worker's own check, a NUL escape reaches Postgres, whose jsonb refuses it.
    def unchecked(result: object, limit: int) -> sandbox.Returned:
        return sandbox.Returned('"\\u0000"' if result == {"poison": True} else json.dumps(result))

    monkeypatch.setattr(sandbox, "result_json", unchecked)
    async with harness(settings) as h, running_worker(settings) as worker:
        ids = [await h.enqueue("demo.echo", {"n": n}) for n in range(5)]
        poison = await h.enqueue("demo.echo", {"poison": True})
        ids += [await h.enqueue("demo.echo", {"n": n}) for n in range(5, 10)]
        for task_id in ids:
            await h.wait_for(task_id, "SUCCEEDED")
        row = await h.wait_for(poison, "FAILED")
        assert row.attempts == 1
        assert row.last_error.startswith("RejectedByDatabase: the result was refused")
        [letter] = await h.dead_letters(1)
        assert letter.message_id == str(poison)
        assert metric(worker, "taskq_dead_lettered_total", queue="default", reason="failed") == 1
