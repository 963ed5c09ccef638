"""Running claimed attempts: handlers under their timeout, leases kept alive, outcomes decided.

Each attempt runs in its own asyncio task, outside any transaction. One
batched heartbeat per worker, every ``min(lease/3, 5 s)``, records the worker
in the ``workers`` registry and extends the lease of every claim it holds
(named by its token); an attempt whose lease turns out lost (the sweeper or
another worker took the task back) is cancelled and records nothing. The
heartbeat also says which tasks an operator asked to cancel: their handler's
context is told at once (``ctx.cancel_requested``) and, if the handler has not
finished ``cancel_grace`` seconds later, its asyncio task is cancelled and the
task recorded CANCELLED.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from prometheus_client import Histogram

from taskq import backoff
from taskq.errors import StoreError, TaskqError
from taskq.handlers import Context, Fail, Registry, Retry
from taskq.metrics import WorkerMetrics
from taskq.outcomes import Finished, Kind
from taskq.settings import Settings
from taskq.store import Row, Store, WorkerInfo

log = logging.getLogger("taskq.worker")

HEARTBEAT_MAX_SECONDS = 5.0
CANCEL_GRACE_SECONDS = 5.0


def heartbeat_interval(lease: float) -> float:
    """Seconds between a worker's heartbeats: a third of the lease, at most 5 s."""
    return min(lease / 3, HEARTBEAT_MAX_SECONDS)


class NoHandler(TaskqError):
    """This worker has no handler for the task's type."""


class Attempt:
    """A claimed attempt, from its claim until its outcome is recorded."""

    __slots__ = ("cancel", "cancel_reason", "id", "number", "queue", "task", "token", "type")

    def __init__(self, row: Row) -> None:
        self.id: uuid.UUID = row["id"]
        self.token: uuid.UUID = row["claim_token"]
        self.number: int = row["attempts"]
        self.type: str = row["type"]
        self.queue: str = row["queue"]
        self.task: asyncio.Task[None] | None = None
        # Why we cancelled it: "shutdown" (give it back), "lost" (record nothing)
        # or "cancel" (an operator's cancel: record CANCELLED).
        self.cancel_reason: str | None = None
        # Set when an operator asks to cancel the task; the handler's context sees it.
        self.cancel = asyncio.Event()


class Runner:
    """Runs attempts and turns each into a :class:`~taskq.outcomes.Finished`.

    Args:
        settings: lease length, maximum delay and the global backoff.
        registry: the handlers.
        worker_id: recorded on claims and heartbeats.
        metrics: the worker's metrics.
        record: takes each outcome for recording.
        release: called once per attempt whose handler is done (a free slot).
        cancel_grace: seconds a handler may go on after it was told of a cancel.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str,
        metrics: WorkerMetrics,
        *,
        record: Callable[[Finished], None],
        release: Callable[[], None],
        cancel_grace: float = CANCEL_GRACE_SECONDS,
    ) -> None:
        self.cancel_grace = cancel_grace
        self.registry = registry
        self.worker_id = worker_id
        self.metrics = metrics
        self.lease = settings.lease_seconds
        self.max_delay = settings.max_delay
        # By claim token: one worker may hold two claims of a task at once (its
        # lease lapsed, the task came back to it while the first still runs).
        self.attempts: dict[uuid.UUID, Attempt] = {}
        self._record = record
        self._release = release
        self._default_backoff = backoff.from_settings(settings)
        self._backoffs: dict[str, backoff.Backoff | None] = {}
        self._children: dict[tuple[Histogram, str], Histogram] = {}

    def load_backoffs(self, type_rows: list[Row]) -> None:
        """Take each task type's backoff from the registry's rows (admins may edit them)."""
        backoffs: dict[str, backoff.Backoff | None] = {}
        for row in type_rows:
            try:
                text = row["backoff"]
                backoffs[row["name"]] = backoff.from_json(orjson.loads(text)) if text else None
            except ValueError as exc:
                log.warning("task type %s has an invalid backoff: %s", row["name"], exc)
        self._backoffs = backoffs

    def begin(self, row: Row) -> None:
        """Start running a claimed row (from the ``claim`` statement)."""
        attempt = Attempt(row)
        self.attempts[attempt.token] = attempt
        self.metrics.in_flight.inc()
        due = max(row["run_at"], row["created_at"])
        wait = (datetime.now(UTC) - due).total_seconds()
        self._child(self.metrics.queue_wait, attempt.queue).observe(max(0.0, wait))
        attempt.task = asyncio.create_task(self._execute(attempt, row))

    def _child(self, histogram: Histogram, label: str) -> Histogram:
        """``histogram.labels(label)``, looked up once per label (it takes a lock each call)."""
        child = self._children.get((histogram, label))
        if child is None:
            child = self._children[histogram, label] = histogram.labels(label)
        return child

    def running(self) -> list[asyncio.Task[None]]:
        return [a.task for a in self.attempts.values() if a.task is not None and not a.task.done()]

    def interrupt(self) -> list[asyncio.Task[None]]:
        """Cancel every running handler; their tasks are given back. Returns the tasks."""
        tasks = []
        for attempt in self.attempts.values():
            if attempt.task is not None and not attempt.task.done():
                attempt.cancel_reason = "shutdown"
                attempt.task.cancel()
                tasks.append(attempt.task)
        return tasks

    def settled(self, token: uuid.UUID) -> None:
        """The outcome of the claim ``token`` is recorded: stop extending its lease."""
        self.attempts.pop(token, None)

    async def _execute(self, attempt: Attempt, row: Row) -> None:
        handler = self.registry.get(attempt.type)
        ctx = Context(
            attempt.id, attempt.type, attempt.number, row["max_attempts"], attempt.queue,
            self.worker_id, _cancel=attempt.cancel,
        )  # fmt: skip
        started = time.perf_counter()
        scope: asyncio.Timeout | None = None
        outcome: Finished | None
        try:
            if handler is None:
                raise NoHandler(f"no handler for task type {attempt.type!r} on {self.worker_id}")
            payload = orjson.loads(row["payload"])
            async with asyncio.timeout(row["timeout_seconds"]) as scope:
                result = await handler.function(payload, ctx)
            outcome = self._finished("complete", attempt, result=_result_json(result))
        except Retry as exc:
            outcome = self._failure(attempt, ctx, _error_text(exc, exc.reason), exc.delay)
        except Fail as exc:
            outcome = self._failure(attempt, ctx, _error_text(exc, exc.reason), final=True)
        except asyncio.CancelledError:
            if attempt.cancel_reason == "shutdown":
                ctx.log.info("interrupted by shutdown: giving the task back")
                outcome = self._finished("give_back", attempt)
            elif attempt.cancel_reason == "lost":
                outcome = None  # another claim owns the task now; record nothing
            elif attempt.cancel_reason == "cancel":
                ctx.log.info("stopped after a cancel was requested")
                outcome = self._finished("cancel", attempt)
            else:
                raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and scope is not None and scope.expired():
                limit = row["timeout_seconds"]
                error = f"TimeoutError: the handler exceeded its timeout of {limit:g}s"
            else:
                error = _error_text(exc)
            ctx.log.warning("attempt failed: %s", error, exc_info=not isinstance(exc, NoHandler))
            outcome = self._failure(attempt, ctx, error)
        finally:
            self._child(self.metrics.duration, attempt.type).observe(time.perf_counter() - started)
            self.metrics.in_flight.dec()
            self._release()
        if outcome is None:  # the lease was lost: counted as a stale outcome
            self.settled(attempt.token)
            self.metrics.processed.labels(attempt.type, attempt.queue, "stale").inc()
        else:
            self._record(outcome)

    @staticmethod
    def _finished(
        kind: Kind,
        attempt: Attempt,
        *,
        result: str | None = None,
        error: str | None = None,
        delay: float = 0.0,
    ) -> Finished:
        return Finished(
            kind, attempt.id, attempt.token, attempt.number, attempt.type, attempt.queue,
            result, error, delay,
        )  # fmt: skip

    def _failure(
        self,
        attempt: Attempt,
        ctx: Context,
        error: str,
        delay: float | None = None,
        *,
        final: bool = False,
    ) -> Finished:
        """A retry after the backoff (or ``delay``), or a failure if ``final`` or none is left."""
        if final or ctx.last_attempt:
            # A handler's Fail is its decision, not an error of the worker's.
            ctx.log.log(logging.WARNING if final else logging.ERROR, "task failed: %s", error)
            return self._finished("fail", attempt, error=error)
        if delay is None:
            delay = self._backoff(attempt.type).delay(attempt.number)
        delay = min(delay, self.max_delay)
        ctx.log.info("retrying in %gs: %s", delay, error)
        return self._finished("retry", attempt, error=error, delay=delay)

    def _backoff(self, task_type: str) -> backoff.Backoff:
        strategy = self._backoffs.get(task_type)
        if strategy is None:
            handler = self.registry.get(task_type)
            strategy = handler.backoff if handler is not None else None
        return strategy or self._default_backoff

    async def heartbeat_loop(self, store: Store, worker: WorkerInfo) -> None:
        """Every heartbeat interval, in one statement: record the worker alive and
        extend the leases of its claims; then cancel the lost attempts and pass on
        cancel requests."""
        while True:
            await asyncio.sleep(worker.heartbeat_seconds)
            attempts = list(self.attempts.values())
            try:
                held = await store.heartbeat(
                    [(a.id, a.token) for a in attempts], worker, self.lease
                )
            except StoreError as exc:
                log.warning("heartbeat of %d leases failed: %s", len(attempts), exc)
                continue
            for attempt in attempts:
                if attempt.task is None or attempt.task.done():
                    continue  # finished; its outcome is being recorded
                if attempt.token not in held:
                    # The lease expired and the task was taken back: free the slot.
                    log.warning("task %s: lease lost, cancelling its handler", attempt.id)
                    attempt.cancel_reason = "lost"
                    attempt.task.cancel()
                elif held[attempt.token] and not attempt.cancel.is_set():
                    log.info("task %s: cancel requested, telling its handler", attempt.id)
                    attempt.cancel.set()
                    loop = asyncio.get_running_loop()
                    loop.call_later(self.cancel_grace, self._stop_cancelled, attempt)

    def _stop_cancelled(self, attempt: Attempt) -> None:
        """The grace after a cancel request is over: cancel a handler still running."""
        if attempt.task is not None and not attempt.task.done() and attempt.cancel_reason is None:
            log.info("task %s: the handler did not stop within the grace; cancelling", attempt.id)
            attempt.cancel_reason = "cancel"
            attempt.task.cancel()


MAX_ERROR_CHARS = 2000
# A JSON \u0000 escape: preceded by an even number of backslashes (none escaped it).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _error_text(exc: BaseException, message: str | None = None) -> str:
    """``Class: message``, storable in a text column and a header: no NUL, valid UTF-8, bounded."""
    text = f"{type(exc).__name__}: {exc if message is None else message}"
    text = text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def _result_json(result: object) -> str:
    """The result as JSON text that Postgres' jsonb accepts.

    Raises:
        TypeError: if the result is not JSON-able.
        ValueError: if it holds a NUL character, which jsonb cannot store.
    """
    text = orjson.dumps(result).decode()
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ValueError("the result contains a NUL character, which Postgres cannot store")
    return text
