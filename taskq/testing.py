"""Test your handlers in-process, without Postgres or RabbitMQ.

:func:`run_handler` runs one attempt of a handler the way a worker runs it, and
returns what the worker would record::

    from taskq.testing import run_handler

    async def test_send_email_retries_while_the_server_is_down() -> None:
        outcome = await run_handler(send_email, {"to": "a@example.com"}, attempt=3)
        assert outcome.retried and outcome.delay == 60

The attempt goes through the worker's own code (:class:`taskq.worker.execution.Runner`
and :mod:`taskq.worker.sandbox`): the payload is checked as an enqueue checks it (and
against ``payload_schema`` if given; one without the field of the handler's ``unique``
key is refused, though uniqueness itself needs the database) and reaches the handler
as JSON does; an ``async def`` runs in an asyncio task of its own, a plain ``def`` in
a thread; the handler's timeout applies; whatever it raises ends the attempt; its result
must be JSON within ``TASKQ_MAX_RESULT_BYTES``; a :class:`~taskq.errors.Retry`,
a :class:`~taskq.errors.Fail`, an exhausted last attempt and the task type's
backoff decide the next step as they do in a worker. ``ctx.log`` logs to
``taskq.task``; ``cancel_after`` plays an operator's cancel.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from taskq.definitions import TaskDefinition
from taskq.enqueue import schemas, task_types, validation
from taskq.errors import FieldError, HandlerError, InvalidRequest
from taskq.handlers import TYPE_NAME, Handler, Registry, registration
from taskq.metrics import WorkerMetrics
from taskq.model import ClaimedTask, OutcomeKind, StopReason, TaskStatus
from taskq.payloads import to_payload
from taskq.settings import Settings, load_settings
from taskq.unique import task_key
from taskq.worker.execution import ABANDON_AFTER_SECONDS, CANCEL_GRACE_SECONDS, Runner
from taskq.worker.outcomes import Finished
from taskq.worker.threads import HandlerThreads

__all__ = ["Outcome", "run_handler", "run_handler_sync"]

WORKER_ID = "taskq.testing"


@dataclass(frozen=True)
class Outcome:
    """What a worker would record of one attempt.

    Attributes:
        status: the task's status after the attempt: ``SUCCEEDED``, ``ENQUEUED``
            (another attempt follows after :attr:`delay`), ``FAILED`` or ``CANCELLED``
            (a :class:`~taskq.model.TaskStatus`, equal to its name as a string).
        result: the handler's result as stored (its JSON, parsed again), if it succeeded.
        error: the error recorded as the task's ``last_error``, if any.
        delay: seconds until the next attempt, when one follows.
        exception: what the handler raised (a :class:`~taskq.errors.Retry`, a
            :class:`~taskq.errors.Fail`, any exception), if it raised.
        timed_out: whether the handler ran past its timeout (the attempt then failed).
    """

    status: TaskStatus
    result: Any = None
    error: str | None = None
    delay: float | None = None
    exception: BaseException | None = None
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == TaskStatus.SUCCEEDED

    @property
    def retried(self) -> bool:
        """Whether another attempt follows (after :attr:`delay` seconds)."""
        return self.status == TaskStatus.ENQUEUED

    @property
    def failed(self) -> bool:
        return self.status == TaskStatus.FAILED

    @property
    def cancelled(self) -> bool:
        return self.status == TaskStatus.CANCELLED


async def run_handler(
    handler: TaskDefinition[Any, Any] | Callable[..., Any] | Handler | str,
    payload: Any,
    *,
    registry: Registry | None = None,
    attempt: int = 1,
    max_attempts: int | None = None,
    timeout: float | None = None,
    payload_schema: dict[str, Any] | None = None,
    cancel_after: float | None = None,
    cancel_grace: float = CANCEL_GRACE_SECONDS,
    settings: Settings | None = None,
    task_id: uuid.UUID | None = None,
) -> Outcome:
    """Run one attempt of ``handler`` with ``payload``, as a worker runs it.

    Args:
        handler: the task definition ``@registry.task`` returned, a handler
            function (an unregistered one gets the default options), its
            :class:`~taskq.handlers.Handler`, or its task type's name (with ``registry``).
        payload: the task's payload: a JSON object, or an instance of the
            handler's payload model (serialised as an enqueue serialises it).
            A handler with a payload model gets it parsed as the worker parses
            it: a payload that does not validate fails the task at once.
        registry: where to look the handler up (default: its last registration).
        attempt: this attempt's number, from 1 (``ctx.attempt``).
        max_attempts: attempts in all (default: the handler's); on the last
            attempt a failure fails the task.
        timeout: seconds the attempt may run (default: the handler's).
        payload_schema: a JSON Schema the payload must match, as the task
            type's ``payload_schema`` in the registry.
        cancel_after: seconds after which an operator cancels the task:
            ``ctx.cancel_requested`` turns true, and the attempt is stopped
            ``cancel_grace`` seconds later if it still runs.
        cancel_grace: see ``cancel_after``.
        settings: the result size limit, the maximum delay and the default
            backoff (default: :func:`~taskq.settings.load_settings`, from the environment).
        task_id: ``ctx.task_id`` (default: a fresh id).

    Returns:
        The :class:`Outcome`.

    Raises:
        InvalidRequest: the payload is one an enqueue refuses (not a JSON
            object, too large, not matching ``payload_schema``), or
            ``attempt``/``max_attempts``/``timeout`` are out of range.
        SchemaProblem: ``payload_schema`` is not a schema taskq accepts.
        HandlerError: ``handler`` is not found in ``registry``, or is not a handler.
        ConfigError: ``settings`` is not given and the environment's are invalid.
    """
    settings = settings or load_settings()
    found = _handler(handler, registry)
    if isinstance(handler, TaskDefinition):
        payload = handler.to_payload(payload)
    else:
        payload = to_payload(payload)
    max_attempts = found.max_attempts if max_attempts is None else max_attempts
    timeout = found.timeout if timeout is None else timeout
    payload_json = _check(found.name, payload, attempt, max_attempts, timeout, settings)
    if found.unique is not None:  # an enqueue refuses a payload without the key's field
        task_key(found.unique, found.name, payload, "payload")
    if payload_schema is not None:
        _check_schema(found.name, payload_schema, payload)

    raised: list[BaseException] = []
    recorded: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()
    threads = HandlerThreads(1)
    runner = Runner(
        settings,
        _watched(found, raised),
        WORKER_ID,
        WorkerMetrics(),
        threads,
        record=recorded.set_result,
        release=lambda: None,
        cancel_grace=cancel_grace,
        abandon_after=ABANDON_AFTER_SECONDS,
    )
    token = uuid.uuid4()
    now = datetime.now(UTC)
    runner.begin(
        ClaimedTask(
            id=task_id or uuid.uuid4(),
            type=found.name,
            queue=found.queue or settings.default_queue,
            payload=payload_json,
            attempts=attempt,
            max_attempts=max_attempts,
            timeout_seconds=timeout,
            run_at=now,
            created_at=now,
            claim_token=token,
        )
    )
    running = runner.attempts[token]
    cancels: list[bool] = []  # an operator's cancel, as the worker's heartbeat tells it

    def cancel() -> None:
        cancels.append(True)
        running.ctx.request_cancel()

    timers = []
    if cancel_after is not None:
        loop = asyncio.get_running_loop()
        timers.append(loop.call_later(cancel_after, cancel))
        timers.append(loop.call_later(cancel_after + cancel_grace, running.stop, StopReason.CANCEL))
    try:
        finished = await recorded
    finally:
        for timer in timers:
            timer.cancel()
        threads.close()
    stop = running.stopped.result() if running.stopped.done() else None
    return _outcome(finished, raised, stop, bool(cancels))


def run_handler_sync(
    handler: TaskDefinition[Any, Any] | Callable[..., Any] | Handler | str,
    payload: Any,
    **options: Any,
) -> Outcome:
    """:func:`run_handler` for code without an event loop (it runs one).

    Raises:
        RuntimeError: when called from a running event loop (await
            :func:`run_handler` there).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_handler(handler, payload, **options))
    raise RuntimeError("run_handler_sync() runs its own event loop: await run_handler() here")


def _handler(
    handler: TaskDefinition[Any, Any] | Callable[..., Any] | Handler | str,
    registry: Registry | None,
) -> Handler:
    """The handler and its options: given, looked up, or the defaults' for a bare function."""
    if isinstance(handler, Handler):
        return handler
    if isinstance(handler, TaskDefinition):
        return handler.handler
    if isinstance(handler, str):
        found = registry.get(handler) if registry is not None else None
        if found is None:
            raise HandlerError(f"no handler for task type {handler!r} in the registry given")
        return found
    if registry is not None:
        for candidate in registry:
            if candidate.function is handler:
                return candidate
    found = registration(handler)
    if found is not None:
        return found
    name = getattr(handler, "__name__", "handler")
    name = name if TYPE_NAME.fullmatch(name) else "handler"
    one = Registry()
    one.task(f"test.{name}")(handler)  # checks it can be a handler (HandlerError)
    [made] = one
    return made


def _check(
    name: str,
    payload: dict[str, Any],
    attempt: int,
    max_attempts: int,
    timeout: float,
    settings: Settings,
) -> str:
    """The payload as the worker reads it from its row; what an enqueue refuses raises."""
    data = {"type": name, "payload": payload, "max_attempts": max_attempts, "timeout": timeout}
    task, _ = validation.enqueue_task(data, settings)
    if not 1 <= attempt <= max_attempts:
        field = FieldError("attempt", f"from 1 to max_attempts ({max_attempts})")
        raise InvalidRequest([field])
    return task.payload_json


def _check_schema(name: str, schema: dict[str, Any], payload: dict[str, Any]) -> None:
    """Check ``payload`` against ``schema`` with the enqueue path's own code."""
    schemas.check_schema(schema)
    task_type = task_types.TaskType(
        name=name,
        queue="",
        max_attempts=1,
        timeout=1.0,
        backoff=None,
        payload_schema=schema,
        enabled=True,
        updated_at=None,
        validator=schemas.PayloadValidator(schema),
    )
    validation.raise_all(task_types.check_payloads([("", task_type, payload)], [0]))


def _watched(handler: Handler, raised: list[BaseException]) -> Registry:
    """A registry of ``handler`` alone, its function wrapped to keep what it raises."""
    function = handler.function
    if handler.sync:

        def watched_sync(payload: dict[str, Any], ctx: Any) -> Any:
            try:
                return function(payload, ctx)
            except BaseException as exc:
                raised.append(exc)
                raise

        wrapper: Callable[..., Any] = watched_sync
    else:

        async def watched_async(payload: dict[str, Any], ctx: Any) -> Any:
            try:
                return await function(payload, ctx)
            except BaseException as exc:
                raised.append(exc)
                raise

        wrapper = watched_async
    one = Registry()
    one.task(
        handler.name,
        max_attempts=handler.max_attempts,
        timeout=handler.timeout,
        backoff=handler.backoff,
    )(wrapper)
    return one


def _outcome(
    finished: Finished, raised: list[BaseException], stop: StopReason | None, cancelled: bool
) -> Outcome:
    # A handler stopped by taskq (its timeout, a cancel) raised nothing of its own.
    exception = raised[-1] if raised and stop is None else None
    timed_out = stop is StopReason.TIMEOUT
    if cancelled or finished.kind is OutcomeKind.CANCEL:
        # The outcome's statement turns a cancelled task CANCELLED, whatever the handler did.
        return Outcome(TaskStatus.CANCELLED, exception=exception, timed_out=timed_out)
    if finished.kind is OutcomeKind.COMPLETE:
        assert finished.result is not None
        return Outcome(TaskStatus.SUCCEEDED, result=orjson.loads(finished.result))
    if finished.kind is OutcomeKind.RETRY:
        return Outcome(
            TaskStatus.ENQUEUED,
            error=finished.error,
            delay=finished.delay,
            exception=exception,
            timed_out=timed_out,
        )
    return Outcome(
        TaskStatus.FAILED, error=finished.error, exception=exception, timed_out=timed_out
    )
