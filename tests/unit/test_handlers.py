"""The handler registry, the handler context, loading MODULE[:ATTR] and the JSON log format."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskq import demo, handlers, logs
from taskq.backoff import FixedBackoff, ListBackoff
from taskq.definitions import TaskDefinition
from taskq.handlers import Context, Fail, HandlerError, Registry, Retry
from taskq.model import Concurrency


async def _noop(payload: dict[str, Any], ctx: Context) -> None:
    return None


def test_decorator_registers_with_options_and_returns_a_definition() -> None:
    registry = Registry()
    decorated = registry.task(
        "email.send.v1", queue="high", max_attempts=3, timeout=30, backoff=[1, "5s"]
    )(_noop)
    assert isinstance(decorated, TaskDefinition)
    assert decorated.function is _noop and decorated.__wrapped__ is _noop
    assert decorated.name == "email.send.v1" and decorated.__name__ == "_noop"
    handler = registry.get("email.send.v1")
    assert handler is not None and decorated.handler is handler
    assert (handler.queue, handler.max_attempts, handler.timeout) == ("high", 3, 30)
    assert handler.backoff == ListBackoff((1.0, 5.0))
    assert handler.function is _noop
    assert "email.send.v1" in registry and len(registry) == 1
    assert [h.name for h in registry] == ["email.send.v1"]
    assert registry.get("other") is None


def test_defaults() -> None:
    registry = Registry()
    registry.task("demo.x", backoff=2)(_noop)
    handler = registry.get("demo.x")
    assert handler is not None
    assert handler.queue is None  # the settings' default queue, decided by the worker
    assert (handler.max_attempts, handler.timeout) == (5, 300.0)
    assert handler.backoff == FixedBackoff(2.0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("bad name", {}, "bad task type"),
        ("", {}, "bad task type"),
        ("ok", {"max_attempts": 0}, "max_attempts"),
        ("ok", {"max_attempts": 101}, "max_attempts"),
        ("ok", {"timeout": 0}, "timeout"),
        ("ok", {"backoff": {"strategy": "never"}}, "invalid backoff"),
    ],
)
def test_invalid_options_are_refused(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(HandlerError, match=message):
        Registry().task(name, **options)


def test_a_type_registered_twice_is_refused() -> None:
    registry = Registry()
    registry.task("demo.x")(_noop)
    with pytest.raises(HandlerError, match="twice"):
        registry.task("demo.x")(_noop)


class _Callable:
    async def __call__(self, payload: dict[str, Any], ctx: Context) -> None:
        return None


def _plain(payload: dict[str, Any], ctx: Context) -> None:
    return None


def test_async_and_plain_functions_register_as_such() -> None:
    registry = Registry()
    registry.task("a")(_noop)
    registry.task("b")(_plain)
    registry.task("c")(_Callable())
    registry.task("d")(functools.partial(_noop))
    registry.task("e")(lambda payload, ctx: None)
    sync = {handler.name: handler.sync for handler in registry}
    assert sync == {"a": False, "b": True, "c": False, "d": False, "e": True}


async def _agen(payload: dict[str, Any], ctx: Context) -> Any:
    yield payload


def _gen(payload: dict[str, Any], ctx: Context) -> Any:
    yield payload


class _Generating:
    def __call__(self, payload: dict[str, Any], ctx: Context) -> Any:
        yield payload


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (_agen, "async generator function"),
        (_gen, "generator function"),
        (_Generating(), "generator function"),
        (_Callable, "is a class"),
        (42, "is not callable"),
        (lambda payload: None, r"must take \(payload, ctx\)"),
        (lambda: None, r"must take \(payload, ctx\)"),
    ],
    ids=["async-generator", "generator", "generating-object", "class", "number", "one", "none"],
)
def test_what_cannot_run_as_a_handler_is_refused_at_registration(
    function: Any, message: str
) -> None:
    with pytest.raises(HandlerError, match=message):
        Registry().task("bad.v1")(function)


async def test_the_context_tells_a_thread_of_a_cancel() -> None:
    ctx = Context(uuid.uuid4(), "demo.echo", 1, 3, "default", "w1")
    with pytest.raises(RuntimeError, match="blocks"):
        ctx.wait_cancelled(0)  # on the event loop's thread
    told = asyncio.get_running_loop().run_in_executor(None, ctx.wait_cancelled, 30)
    assert not ctx.cancel_requested
    ctx.request_cancel()
    assert await told is True and ctx.cancel_requested
    await asyncio.wait_for(ctx.cancelled(), 1)


def test_control_flow_exceptions() -> None:
    retry = Retry(delay=3, reason="rate limited")
    assert (retry.delay, retry.reason) == (3, "rate limited")
    assert Retry().delay is None
    with pytest.raises(ValueError):
        Retry(delay=-1)
    assert Fail("bad input").reason == "bad input"


def test_context_logger_carries_the_task(caplog: pytest.LogCaptureFixture) -> None:
    task_id = uuid.uuid4()
    ctx = Context(task_id, "demo.echo", 2, 3, "default", "w1")
    assert not ctx.last_attempt
    with caplog.at_level(logging.INFO, logger="taskq.task"):
        ctx.log.info("hello %s", "there")
    record = caplog.records[-1]
    assert record.getMessage() == "hello there"
    assert (record.task_id, record.task_type, record.attempt) == (str(task_id), "demo.echo", 2)  # type: ignore[attr-defined]
    assert Context(task_id, "demo.echo", 3, 3, "default", "w1").last_attempt


def test_load_finds_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert handlers.load("taskq.demo") is demo.handlers
    assert handlers.load("taskq.demo:handlers") is demo.handlers
    (tmp_path / "my_tasks.py").write_text(
        "from taskq.handlers import Registry\n"
        "tasks = Registry()\n"
        "@tasks.task('mine.v1')\n"
        "async def mine(payload, ctx):\n"
        "    return payload\n"
        "empty = Registry()\n"
        "other = 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "mine.v1" in handlers.load("my_tasks:tasks")
        with pytest.raises(HandlerError, match=r"my_tasks\.handlers is not"):
            handlers.load("my_tasks")
        with pytest.raises(HandlerError, match=r"is not a taskq\.handlers\.Registry"):
            handlers.load("my_tasks:other")
        with pytest.raises(HandlerError, match="has no handlers"):
            handlers.load("my_tasks:empty")
        with pytest.raises(HandlerError, match="cannot import"):
            handlers.load("no_such_module_here")
    finally:
        sys.modules.pop("my_tasks", None)


def test_demo_handlers_are_all_there() -> None:
    names = {handler.name for handler in demo.handlers}
    assert {"email.send.v1", "demo.noop", "demo.echo", "demo.sleep", "demo.fail"} <= names
    noop_sync = demo.handlers.get("demo.noop_sync")
    assert noop_sync is not None and noop_sync.sync


async def test_demo_fail_semantics() -> None:
    def ctx(attempt: int) -> Context:
        return Context(uuid.uuid4(), "demo.fail", attempt, 5, "default", "w")

    with pytest.raises(demo.DemoFailure):
        await demo.fail({"times": 2}, ctx(2))
    assert await demo.fail({"times": 2}, ctx(3)) == {"succeeded_on_attempt": 3}
    with pytest.raises(demo.DemoFailure):
        await demo.fail({}, ctx(5))
    with pytest.raises(Fail):
        await demo.fail({"fatal": True}, ctx(1))


def test_json_log_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("taskq.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("attempt %d failed", 2, extra={"task_id": "abc", "attempt": 2})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("with a traceback")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "attempt 2 failed"
    assert (first["level"], first["logger"]) == ("WARNING", "taskq.test-json")
    assert (first["task_id"], first["attempt"]) == ("abc", 2)
    assert first["ts"].endswith("+00:00")
    assert "ValueError: boom" in second["exc"]


def test_a_concurrency_limit_is_checked_at_import() -> None:
    registry = Registry()
    registry.task("limited.v1", concurrency={"key": "customer_id", "limit": 2})(_noop)
    handler = registry.get("limited.v1")
    assert handler is not None and handler.concurrency == Concurrency(2, "customer_id")
    registry.task("whole.v1", concurrency={"limit": 1})(_noop)
    assert registry.get("whole.v1").concurrency == Concurrency(1)
    for bad in (
        {"limit": 0},
        {"limit": 10_001},
        {"limit": True},
        {"limit": "2"},
        {"key": "k"},
        {"limit": 1, "key": ""},
        {"limit": 1, "key": 5},
        {"limit": 1, "other": 1},
        [("limit", 1)],
    ):
        with pytest.raises(HandlerError, match="concurrency"):
            Registry().task("bad.v1", concurrency=bad)(_noop)  # type: ignore[arg-type]
