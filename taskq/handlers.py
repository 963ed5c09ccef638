"""Handlers: the registry of task types a worker can run, and what a handler sees.

A handler takes the task's payload and a :class:`Context` and returns a JSON-able
result. An ``async def`` runs on the worker's event loop; a plain ``def`` runs in
one of the worker's threads, so it may block::

    from taskq.handlers import Fail, Registry, Retry

    handlers = Registry()

    @handlers.task("email.send.v1", queue="high", max_attempts=5, timeout=30)
    async def send_email(payload: dict, ctx: Context) -> dict:
        ctx.log.info("sending to %s", payload["to"])
        return {"sent": True}

    @handlers.task("report.render.v1", timeout=600)
    def render(payload: Report, ctx: Context) -> Rendered:  # pydantic models, dataclasses
        ...  # blocking code

The decorator returns a :class:`~taskq.definitions.TaskDefinition`: the
function, with ``.enqueue(client, payload)``. A payload parameter annotated with
a pydantic model, a dataclass or a ``TypedDict`` gets the parsed object, and a
return annotated with one is serialised through it (:mod:`taskq.payloads`).

Anything a handler raises, ``BaseException`` included (``sys.exit()``, a
``KeyboardInterrupt``), is a retryable failure: the task is retried after its
backoff while attempts are left, then FAILED and dead-lettered. Two exceptions
are control flow rather than errors, and are not logged as errors:
:class:`Retry` asks for another attempt after a given delay, :class:`Fail` ends
the task as FAILED at once. A result that is not JSON or is larger than
``TASKQ_MAX_RESULT_BYTES`` fails the task at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import orjson

from taskq import backoff as backoff_
from taskq import cron, payloads, ratelimits
from taskq import unique as unique_
from taskq.definitions import TaskDefinition
from taskq.errors import CronProblem, FieldError, InvalidRequest

# Defined in taskq.errors; importing them from here keeps working.
from taskq.errors import Fail as Fail
from taskq.errors import HandlerError as HandlerError
from taskq.errors import Retry as Retry
from taskq.model import MAX_CONCURRENCY, Concurrency

TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_TIMEOUT = 300.0
# The largest ``details`` of a progress report, in bytes of JSON.
MAX_PROGRESS_DETAILS_BYTES = 8192

log = logging.getLogger("taskq.task")

# ``async def f(payload, ctx)`` or ``def f(payload, ctx)``.
HandlerFunction: TypeAlias = Callable[[dict[str, Any], "Context"], Any]
P = TypeVar("P")
R = TypeVar("R")
BackoffSpec: TypeAlias = (
    backoff_.Backoff | Mapping[str, Any] | Sequence[float | str] | float | str | None
)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule declared with a handler (``@handlers.task(..., schedule=...)``): the
    worker puts it in ``schedules`` at its start, named ``name`` (default: the task
    type's name), with ``source`` ``code``. The fields are those of
    ``PUT /schedules/{name}`` (docs/http-api.md): exactly one of ``cron`` (in
    ``timezone``) and ``every`` (seconds, or a duration such as ``"30s"``)."""

    cron: str | None = None
    every: float | str | None = None
    timezone: str = "UTC"
    payload: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    queue: str | None = None
    catch_up: str = "once"
    catch_up_limit: int = 100
    overlap: str = "allow"

    def definition(self, task_type: str) -> tuple[str, dict[str, Any]]:
        """The schedule's name and its body as ``PUT /schedules/{name}`` takes it."""
        body: dict[str, Any] = {
            "timezone": self.timezone,
            "type": task_type,
            "payload": dict(self.payload),
            "queue": self.queue,
            "catch_up": self.catch_up,
            "catch_up_limit": self.catch_up_limit,
            "overlap": self.overlap,
        }
        if self.cron is not None:
            body["cron"] = self.cron
        if self.every is not None:
            body["every"] = self.every
        return self.name or task_type, body


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler and its options.

    ``queue``, ``max_attempts``, ``timeout`` and ``backoff`` are the task type's
    defaults, registered by the worker at start; ``queue=None`` means the
    default queue of the worker's settings, ``backoff=None`` the global backoff.
    A task may carry its own max attempts and timeout from its enqueue.
    ``sync`` says that ``function`` is a plain function, run in a thread.
    ``function`` is what the worker calls with the payload as stored (a JSON
    object): the decorated function itself, or, when its annotations name a
    payload model, the function with its payload parsed and its result
    serialised (:mod:`taskq.payloads`). ``payload_schema_json`` is the payload
    model's JSON Schema, which the worker registers as the type's.
    ``concurrency`` is the type's concurrency limit, registered likewise.
    """

    name: str
    function: HandlerFunction
    queue: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    backoff: backoff_.Backoff | None = None
    sync: bool = False
    payload_schema_json: str | None = None
    schedule: Schedule | None = None
    unique: unique_.Unique | None = None
    concurrency: Concurrency | None = None
    rate_limit: ratelimits.RateLimit | str | None = None


@dataclass(slots=True)
class Context:
    """What a handler knows about the task it runs.

    Attributes:
        task_id: the task's id.
        type: the task type.
        attempt: this attempt's number, from 1.
        max_attempts: attempts allowed in all.
        queue: the work queue the task came from.
        worker_id: the worker running it.
        workflow_id: the workflow whose node the task is (None: enqueued alone).
        parent_results: a workflow node's parents' results, parsed from JSON, in the
            order of its ``depends_on`` (a group's callback: the group's order); empty
            for a node without parents and a task enqueued alone.

    When an operator cancels the running task (``POST /tasks/{id}/cancel``), the
    worker learns it with its next heartbeat: :attr:`cancel_requested` turns
    true, :meth:`cancelled` returns and :meth:`wait_cancelled` too. A handler
    that returns or raises after that ends the task CANCELLED; after the
    worker's cancel grace one that goes on is cancelled (an async handler's
    asyncio task) or abandoned (a sync handler's thread). The same flag turns
    true when the worker stops waiting for the attempt for another reason (its
    timeout, a shutdown): a sync handler that checks it can end its thread.
    A context is safe to use from a sync handler's thread.
    """

    task_id: uuid.UUID
    type: str
    attempt: int
    max_attempts: int
    queue: str
    worker_id: str
    workflow_id: uuid.UUID | None = None
    parent_results: list[Any] = field(default_factory=list)
    _log: logging.LoggerAdapter[logging.Logger] | None = field(default=None, repr=False)
    _cancel: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _report: Callable[[float, str | None], None] | None = field(default=None, repr=False)

    def progress(self, fraction: float, details: Mapping[str, Any] | None = None) -> Reported:
        """Report how far this attempt has come: ``GET /tasks/{id}``, the event stream and
        the dashboard show the latest report.

        Call it as often as is convenient: the worker keeps only the latest report of
        each task and writes them at most every ``TASKQ_PROGRESS_INTERVAL`` (1 s), all
        in one statement, never to the task's own row. Reports made once
        :attr:`cancel_requested` is true are dropped. It returns at once, from an
        async handler (``await ctx.progress(0.4)``) and from a sync handler's thread
        (``ctx.progress(0.4)``) alike.

        Args:
            fraction: done so far, from 0 to 1.
            details: a JSON object to show with it (``{"rows": 4000}``), at most
                :data:`MAX_PROGRESS_DETAILS_BYTES` bytes of JSON.

        Raises:
            InvalidRequest: naming ``fraction`` or ``details``; nothing is reported.
        """
        text = check_progress(fraction, details)
        # Once the worker stops waiting for the attempt (its timeout, a shutdown, a
        # cancel), a handler that goes on says nothing more about the task.
        if self._report is not None and not self._stop.is_set():
            self._report(float(fraction), text)
        return _REPORTED

    @property
    def cancel_requested(self) -> bool:
        """Whether this attempt should stop soon and return (an operator's cancel, or
        the worker no longer waits for it)."""
        return self._stop.is_set()

    async def cancelled(self) -> None:
        """Wait until :attr:`cancel_requested` turns true (async handlers)."""
        await self._cancel.wait()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until :attr:`cancel_requested` turns true or ``timeout`` seconds pass;
        returns :attr:`cancel_requested` (sync handlers: an interruptible sleep).

        Raises:
            RuntimeError: on an event loop's thread, which it would block.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._stop.wait(timeout)
        raise RuntimeError("wait_cancelled() blocks its thread: use `await ctx.cancelled()`")

    def request_cancel(self) -> None:
        """Turn :attr:`cancel_requested` true (the worker calls it, on its event loop)."""
        self._stop.set()
        self._cancel.set()

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry ``task_id``, ``task_type`` and ``attempt``."""
        if self._log is None:
            self._log = logging.LoggerAdapter(log, self.log_fields())
        return self._log

    @property
    def last_attempt(self) -> bool:
        """Whether a failure of this attempt fails the task for good."""
        return self.attempt >= self.max_attempts

    def log_fields(self) -> dict[str, Any]:
        return {"task_id": str(self.task_id), "task_type": self.type, "attempt": self.attempt}


class Reported:
    """What :meth:`Context.progress` returns: awaiting it does nothing (the report is
    taken already), so async and sync handlers call it alike."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that ends at once


_REPORTED = Reported()


def check_progress(fraction: object, details: object) -> str | None:
    """Check a progress report; returns ``details`` as JSON text (None if none).

    Raises:
        InvalidRequest: naming ``fraction`` or ``details``.
    """
    errors = []
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= 1  # NaN fails too
    ):
        errors.append(FieldError("fraction", "must be a number from 0 to 1"))
    text = None
    if details is not None:
        if not isinstance(details, Mapping):
            errors.append(FieldError("details", "must be a JSON object (a dict) or None"))
        else:
            try:
                text = orjson.dumps(details).decode()
            except (TypeError, orjson.JSONEncodeError) as exc:
                errors.append(FieldError("details", f"must be JSON-able: {exc}"))
            else:
                if len(text) > MAX_PROGRESS_DETAILS_BYTES:
                    errors.append(
                        FieldError(
                            "details",
                            f"{len(text)} bytes of JSON, over {MAX_PROGRESS_DETAILS_BYTES}",
                        )
                    )
                elif "\\u0000" in text:
                    errors.append(FieldError("details", "strings may not contain NUL (\\u0000)"))
    if errors:
        raise InvalidRequest(errors)
    return text


class Registry:
    """Handlers by task type name. Modules declare ``handlers = Registry()`` and decorate."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def task(
        self,
        name: str,
        *,
        queue: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: BackoffSpec = None,
        schedule: str | Schedule | None = None,
        tz: str = "UTC",
        unique: Mapping[str, Any] | None = None,
        concurrency: Mapping[str, Any] | Concurrency | None = None,
        rate_limit: Mapping[str, Any] | ratelimits.RateLimit | str | None = None,
    ) -> Callable[[Callable[[P, Context], R]], TaskDefinition[P, R]]:
        """Register the decorated ``async def`` or ``def`` ``fn(payload, ctx)`` for ``name``.

        Returns a :class:`~taskq.definitions.TaskDefinition`: callable as the
        function, with ``.enqueue(client, payload, ...)``. When the payload
        parameter is annotated with a pydantic model, a dataclass or a
        ``TypedDict``, the worker hands the handler the parsed object (a payload
        that does not validate fails the task at once, naming the field), and
        the model's JSON Schema becomes the type's ``payload_schema``; a return
        annotated with a model is serialised through it.

        Args:
            name: the task type, e.g. ``email.send.v1`` (letters, digits, ``._:-``).
            queue: the type's default queue; ``None``: the settings' default queue.
            max_attempts: attempts in all, 1-100.
            timeout: seconds an attempt may run before it is cancelled.
            backoff: a :mod:`taskq.backoff` strategy, its JSON shape, a list of
                delays or one fixed delay; ``None``: the global default.
            schedule: enqueue this type on a schedule: a cron expression (in the
                zone ``tz``), or a :class:`Schedule` with every option. Workers
                that run the handler declare it at their start.
            tz: the IANA time zone of a cron expression given as ``schedule``.
            unique: at most one task of this type per key, for enqueues that give
                no ``unique`` of their own: ``{"key": "$.user_id", "while":
                "queued" | "active" | "until_finished", "for": "10m",
                "on_conflict": "keep" | "replace"}`` (docs/producers.md). Workers
                that run the handler register it with the type at their start.
            concurrency: at most ``limit`` tasks of this type RUNNING at once across
                the fleet per value of the payload field ``key`` (no key: for the
                whole type), e.g. ``{"key": "customer_id", "limit": 2}``; the others
                wait (WAITING) and start, oldest first, as slots free.
            rate_limit: at most so many starts of this type per interval, across
                the fleet: ``{"limit": 100, "per": "1m"}`` (optionally ``"burst"``,
                and ``"key"``: a payload field, one limit per value of it), or the
                name of a limiter shared with other types (``PUT /limits/{name}``).
                Tasks over it wait for their slot (:mod:`taskq.ratelimits`).

        Raises:
            HandlerError: for invalid options, a name registered twice, a
                function that is neither an ``async def`` nor a plain function
                taking ``(payload, ctx)`` (a generator, a class, ...), or
                annotations naming a model pydantic cannot use.
        """
        if not TYPE_NAME.match(name):
            raise HandlerError(f"bad task type {name!r}: use letters, digits, '.', '_', ':', '-'")
        if name in self._handlers:
            raise HandlerError(f"task type {name!r} is registered twice")
        if not 1 <= max_attempts <= 100:
            raise HandlerError(f"{name}: max_attempts must be between 1 and 100")
        if not timeout > 0:
            raise HandlerError(f"{name}: timeout must be positive")
        try:
            strategy = None if backoff is None else backoff_.coerce(backoff)
        except ValueError as exc:
            raise HandlerError(f"{name}: invalid backoff: {exc}") from None
        declared = _schedule(name, schedule, tz)
        try:
            uniqueness = None if unique is None else unique_.parse(dict(unique))
        except InvalidRequest as exc:
            raise HandlerError(f"{name}: invalid unique: {exc}") from None
        limit = _concurrency(name, concurrency)
        rate = _rate_limit(name, rate_limit)

        def register(function: Callable[[P, Context], R]) -> TaskDefinition[P, R]:
            if isinstance(function, TaskDefinition):
                function = function.function  # registered again, in another registry
            sync = _is_sync(name, function)
            model = payloads.inspect_handler(name, function)
            called: HandlerFunction = function  # type: ignore[assignment]  # P is a dict here
            handler = Handler(
                name,
                called if model is None else model.wrap(function, sync),
                queue,
                max_attempts,
                timeout,
                strategy,
                sync,
                None if model is None else model.schema_json,
                declared,
                uniqueness,
                limit,
                rate,
            )
            self._handlers[name] = handler
            definition = TaskDefinition(handler, function, model)
            # Not every callable can be a weak key (a class with __slots__, an unhashable
            # object): taskq.testing then needs the registry to find its options.
            with contextlib.suppress(TypeError):
                _REGISTERED[function] = handler
            return definition

        return register

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[Handler]:
        return iter(self._handlers.values())

    def __len__(self) -> int:
        return len(self._handlers)


# The last registration of each function, so that :mod:`taskq.testing` finds a
# handler's options from the function alone.
_REGISTERED: weakref.WeakKeyDictionary[Any, Handler] = weakref.WeakKeyDictionary()


def registration(function: object) -> Handler | None:
    """The options ``function`` was last registered with (by any :class:`Registry`),
    or the handler of a :class:`~taskq.definitions.TaskDefinition`."""
    if isinstance(function, TaskDefinition):
        return function.handler
    try:
        return _REGISTERED.get(function)
    except TypeError:  # not a possible weak key: never registered here
        return None


def _concurrency(name: str, spec: Mapping[str, Any] | Concurrency | None) -> Concurrency | None:
    """A handler's ``concurrency=``, checked now (at import)."""
    if spec is None or isinstance(spec, Concurrency):
        return spec
    if not isinstance(spec, Mapping) or set(spec) - {"key", "limit"}:
        raise HandlerError(f'{name}: concurrency must be {{"key": <payload field>, "limit": n}}')
    limit, key = spec.get("limit"), spec.get("key")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_CONCURRENCY:
        raise HandlerError(f"{name}: concurrency limit must be an integer 1-{MAX_CONCURRENCY}")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        raise HandlerError(f"{name}: concurrency key must be a payload field name (1-200 chars)")
    return Concurrency(limit, key)


def _schedule(name: str, schedule: str | Schedule | None, tz: str) -> Schedule | None:
    """A handler's ``schedule=``, its cron expression and zone checked now (at import),
    the rest by the worker that declares it."""
    if schedule is None:
        return None
    if isinstance(schedule, str):
        schedule = Schedule(cron=schedule, timezone=tz)
    elif not isinstance(schedule, Schedule):
        raise HandlerError(f"{name}: schedule must be a cron expression or a taskq.Schedule")
    if (schedule.cron is None) == (schedule.every is None):
        raise HandlerError(f"{name}: a schedule needs either cron or every")
    try:
        if schedule.cron is not None:
            cron.parse(schedule.cron)
        cron.zone(schedule.timezone)
    except CronProblem as exc:
        raise HandlerError(f"{name}: invalid schedule: {exc}") from None
    return schedule


def _is_sync(name: str, function: object) -> bool:
    """Whether ``function`` is a plain function (``False``: an ``async def``).

    Raises:
        HandlerError: for anything else: its call could not run as a handler.
    """
    if inspect.isclass(function):
        raise HandlerError(f"{name}: the handler is a class; register a function")
    if not callable(function):
        raise HandlerError(f"{name}: the handler {function!r} is not callable")
    # A callable object is judged by its __call__ (a partial is unwrapped by inspect).
    targets: list[object] = [function]
    if not inspect.isroutine(function):
        targets.append(type(function).__call__)
    if any(inspect.isasyncgenfunction(t) for t in targets):
        raise HandlerError(
            f"{name}: the handler is an async generator function; use async def and return"
        )
    if any(inspect.isgeneratorfunction(t) for t in targets):
        raise HandlerError(f"{name}: the handler is a generator function; use def and return")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError as exc:
        raise HandlerError(f"{name}: the handler must take (payload, ctx): {exc}") from None
    except ValueError:
        pass  # no signature to read (some builtins): its call will tell
    return not any(inspect.iscoroutinefunction(t) for t in targets)


def load(spec: str) -> Registry:
    """Import ``module[:attr]`` and return its registry (``attr`` defaults to ``handlers``).

    Raises:
        HandlerError: if the module cannot be imported or holds no :class:`Registry`.
    """
    module_name, _, attr = spec.partition(":")
    attr = attr or "handlers"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attr, None)
    if not isinstance(registry, Registry):
        raise HandlerError(f"{module_name}.{attr} is not a taskq.handlers.Registry")
    if not registry:
        raise HandlerError(f"{module_name}.{attr} has no handlers")
    return registry


def _rate_limit(
    name: str, value: Mapping[str, Any] | ratelimits.RateLimit | str | None
) -> ratelimits.RateLimit | str | None:
    """A handler's ``rate_limit=`` checked: its own limit, or a limiter's name."""
    if value is None or isinstance(value, ratelimits.RateLimit):
        return value
    if isinstance(value, str):
        if not ratelimits.LIMITER_NAME.match(value):
            raise HandlerError(f"{name}: rate_limit {value!r} is not a limiter name")
        return value
    try:
        return ratelimits.parse(value)
    except ValueError as exc:
        raise HandlerError(f"{name}: invalid rate_limit: {exc}") from None
