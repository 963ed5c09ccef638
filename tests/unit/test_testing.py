"""taskq.testing: a handler's attempt run in-process, as a worker runs it, without services."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import pytest

from taskq import Context, Fail, Registry, Retry
from taskq.errors import HandlerError, InvalidRequest, SchemaProblem, TooLarge
from taskq.model import TaskStatus
from taskq.settings import load_settings
from taskq.testing import Outcome, run_handler, run_handler_sync

handlers = Registry()


@handlers.task("test.echo.v1", max_attempts=3, backoff=[7, 9])
async def echo(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    ctx.log.info("echoing %s", payload)
    return {"payload": payload, "attempt": ctx.attempt, "task_id": str(ctx.task_id)}


@handlers.task("test.echo_sync.v1")
def echo_sync(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"thread": threading.current_thread().name, "payload": payload}


@handlers.task("test.retry.v1", max_attempts=3)
async def asks_retry(payload: dict[str, Any], ctx: Context) -> None:
    raise Retry(payload.get("delay"), "the server is down")


@handlers.task("test.fail.v1")
def fails(payload: dict[str, Any], ctx: Context) -> None:
    raise Fail("no such address")


@handlers.task("test.raises.v1", max_attempts=3, backoff=[7, 9])
def raises(payload: dict[str, Any], ctx: Context) -> None:
    raise ValueError("bad data")


@handlers.task("test.slow.v1", timeout=0.1, max_attempts=2, backoff=[3])
async def slow(payload: dict[str, Any], ctx: Context) -> None:
    await asyncio.sleep(30)


# slow_sync blocks until the test lets it go, and says when it returned.
RELEASE_SLOW_SYNC = threading.Event()
SLOW_SYNC_RETURNED = threading.Event()


@handlers.task("test.slow_sync.v1", timeout=0.1)
def slow_sync(payload: dict[str, Any], ctx: Context) -> None:
    RELEASE_SLOW_SYNC.wait(30)  # a thread cannot be stopped: it is abandoned, as in a worker
    SLOW_SYNC_RETURNED.set()


@handlers.task("test.stops_when_cancelled.v1")
async def stops_when_cancelled(payload: dict[str, Any], ctx: Context) -> str:
    await ctx.cancelled()
    return "stopped"


@handlers.task("test.ignores_cancel.v1")
async def ignores_cancel(payload: dict[str, Any], ctx: Context) -> None:
    await asyncio.sleep(30)


@handlers.task("test.not_json.v1")
async def not_json(payload: dict[str, Any], ctx: Context) -> object:
    return object()


@handlers.task("test.unique.v1", unique={"key": "$.user"})
async def per_user(payload: dict[str, Any], ctx: Context) -> str:
    return "ok"


async def test_a_payload_without_the_unique_keys_field_is_refused_as_an_enqueue_refuses_it() -> (
    None
):
    assert (await run_handler(per_user, {"user": 1})).succeeded
    with pytest.raises(InvalidRequest, match=r"payload: the payload has no value at \$\.user"):
        await run_handler(per_user, {"name": "a"})


async def test_a_success_returns_the_result_as_stored() -> None:
    task_id = uuid.uuid4()
    outcome = await run_handler(echo, {"n": 1.0}, attempt=2, task_id=task_id)
    assert outcome == Outcome(
        TaskStatus.SUCCEEDED,
        result={"payload": {"n": 1.0}, "attempt": 2, "task_id": str(task_id)},
    )
    assert outcome.succeeded and not outcome.retried and not outcome.failed
    # The status is the model's enum, equal to its name as before.
    assert outcome.status is TaskStatus.SUCCEEDED and outcome.status == "SUCCEEDED"


async def test_a_sync_handler_runs_in_a_thread() -> None:
    outcome = await run_handler(echo_sync, {"a": [1, 2]})
    assert outcome.succeeded
    assert outcome.result["payload"] == {"a": [1, 2]}
    assert outcome.result["thread"] != threading.current_thread().name


async def test_a_retry_keeps_its_delay_and_reason() -> None:
    outcome = await run_handler(asks_retry, {"delay": 12})
    assert outcome.retried
    assert outcome.delay == 12
    assert outcome.error == "Retry: the server is down"
    assert isinstance(outcome.exception, Retry)


async def test_a_retry_without_delay_takes_the_backoff_and_the_last_attempt_fails() -> None:
    assert (await run_handler(asks_retry, {}, attempt=1)).delay == 5.0  # the global default
    last = await run_handler(asks_retry, {}, attempt=3)
    assert last.failed and last.delay is None


async def test_fail_ends_the_task_at_once() -> None:
    outcome = await run_handler(fails, {}, attempt=1)
    assert outcome.failed
    assert outcome.error == "Fail: no such address"
    assert isinstance(outcome.exception, Fail)


async def test_an_exception_is_retried_after_the_types_backoff_then_fails() -> None:
    first = await run_handler(raises, {}, attempt=1)
    second = await run_handler(raises, {}, attempt=2)
    last = await run_handler(raises, {}, attempt=3)
    assert (first.status, first.delay) == ("ENQUEUED", 7)
    assert (second.status, second.delay) == ("ENQUEUED", 9)
    assert last.failed and last.error == "ValueError: bad data"
    assert isinstance(last.exception, ValueError)


async def test_max_attempts_given_here_wins() -> None:
    assert (await run_handler(raises, {}, attempt=1, max_attempts=1)).failed


async def test_a_handler_past_its_timeout_fails_its_attempt() -> None:
    outcome = await run_handler(slow, {})
    assert outcome.timed_out and outcome.retried and outcome.delay == 3
    assert outcome.error == "TimeoutError: the handler exceeded its timeout of 0.1s"
    assert outcome.exception is None  # taskq stopped it; the handler raised nothing


async def test_a_sync_handler_past_its_timeout_is_abandoned() -> None:
    try:
        outcome = await run_handler(slow_sync, {})
        assert outcome.timed_out and outcome.retried
        assert not SLOW_SYNC_RETURNED.is_set()  # the thread runs on; the attempt is over
    finally:
        RELEASE_SLOW_SYNC.set()


async def test_a_result_that_is_not_json_fails_the_task() -> None:
    outcome = await run_handler(not_json, {})
    assert outcome.failed
    assert outcome.error is not None and outcome.error.startswith("InvalidResult")


async def test_a_result_over_the_limit_fails_the_task() -> None:
    settings = load_settings(max_result_bytes=1024)
    outcome = await run_handler(echo, {"text": "x" * 2000}, settings=settings)
    assert outcome.failed
    assert outcome.error is not None and "TASKQ_MAX_RESULT_BYTES" in outcome.error


async def test_a_cancel_tells_the_handler_and_cancels_the_task() -> None:
    outcome = await run_handler(stops_when_cancelled, {}, cancel_after=0.05)
    assert outcome.cancelled and not outcome.timed_out


async def test_a_handler_ignoring_a_cancel_is_stopped_after_the_grace() -> None:
    started = time.monotonic()
    outcome = await run_handler(ignores_cancel, {}, cancel_after=0.05, cancel_grace=0.1)
    assert outcome.cancelled
    assert time.monotonic() - started < 5


async def test_a_payload_an_enqueue_refuses_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="payload"):
        await run_handler(echo, [1, 2])
    with pytest.raises(TooLarge):
        await run_handler(echo, {"x": "y" * 2000}, settings=load_settings(max_payload_bytes=1024))


async def test_a_payload_is_checked_against_the_schema_given() -> None:
    schema = {"type": "object", "required": ["to"], "properties": {"to": {"type": "string"}}}
    assert (await run_handler(echo, {"to": "a@example.com"}, payload_schema=schema)).succeeded
    with pytest.raises(InvalidRequest, match=r"payload\.to"):
        await run_handler(echo, {"to": 3}, payload_schema=schema)
    with pytest.raises(SchemaProblem):
        await run_handler(echo, {}, payload_schema={"type": "no-such-type"})


@pytest.mark.parametrize(("attempt", "max_attempts"), [(0, None), (4, None), (2, 1)])
async def test_an_attempt_out_of_range_is_refused(attempt: int, max_attempts: int | None) -> None:
    with pytest.raises(InvalidRequest, match="attempt"):
        await run_handler(echo, {}, attempt=attempt, max_attempts=max_attempts)


async def test_the_handler_is_found_by_name_in_a_registry() -> None:
    assert (await run_handler("test.echo.v1", {}, registry=handlers)).succeeded
    with pytest.raises(HandlerError, match="no handler"):
        await run_handler("test.nothing.v1", {}, registry=handlers)
    handler = handlers.get("test.fail.v1")
    assert handler is not None
    assert (await run_handler(handler, {})).failed


async def test_an_unregistered_function_gets_the_default_options() -> None:
    async def plain(payload: dict[str, Any], ctx: Context) -> str:
        return ctx.type

    assert (await run_handler(plain, {})).result == "test.plain"
    with pytest.raises(HandlerError, match="generator"):

        def generator(payload: dict[str, Any], ctx: Context) -> Any:
            yield 1

        await run_handler(generator, {})


async def test_the_context_logs_with_the_tasks_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="taskq.task")
    await run_handler(echo, {"n": 1})
    [record] = [r for r in caplog.records if r.getMessage().startswith("echoing")]
    assert record.__dict__["task_type"] == "test.echo.v1"
    assert record.__dict__["attempt"] == 1


def test_the_sync_variant_runs_its_own_loop() -> None:
    assert run_handler_sync(echo, {"n": 2}).result["payload"] == {"n": 2}


async def test_the_sync_variant_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="await run_handler"):
        run_handler_sync(echo, {})
