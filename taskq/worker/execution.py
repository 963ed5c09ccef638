"""Running claimed attempts: handlers under their timeout, leases kept alive, outcomes decided.

Each attempt runs in its own asyncio task, outside any transaction (but for
the short inline window of :mod:`taskq.worker.inline`, until its claim
commits), and that task only *watches* the handler: an ``async def`` handler
runs in an asyncio task of its own, a plain ``def`` in a thread of
:mod:`taskq.worker.threads`, and whatever the call ends with
(:mod:`taskq.worker.sandbox`) becomes the attempt's outcome. The watching task
stops waiting for the handler when its timeout passes, when the worker shuts
down, when an operator's cancel has had its grace, or when the lease turns out
lost; it records that outcome (a failed attempt, the task
given back, CANCELLED, or nothing) whatever the handler does next. An async
handler is cancelled and given :data:`ABANDON_AFTER_SECONDS` to unwind; one that
swallows the cancellation, like a sync handler's thread, is abandoned: it runs
on unwatched, counted by ``taskq_abandoned_handlers_running``, and its result is lost.

One batched heartbeat per worker, every ``min(lease/3, 5 s)``, records the worker
in the worker list (``workers``) and extends the lease of every claim it holds
(named by its token): running attempts, and those whose outcome waits to be
recorded (:mod:`taskq.worker.outcomes`), never one already closed. An attempt whose
lease turns out lost (the sweeper or another worker took the task back) is
stopped and records nothing. The heartbeat also says which tasks an operator
asked to cancel: their handler's context is told at once
(``ctx.cancel_requested``) and, if the handler has not finished ``cancel_grace``
seconds later, the attempt is stopped and the task recorded CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Histogram

from taskq import backoff, tracing
from taskq.errors import Fail, ParentResultsTooLarge, Retry, StoreError

# Defined in taskq.errors; importing them from here keeps working.
from taskq.errors import NoHandler as NoHandler
from taskq.handlers import Context, Handler, Registry
from taskq.metrics import AbandonedKind, WorkerMetrics
from taskq.model import ClaimedTask, OutcomeKind, StopReason, TaskTypeRecord
from taskq.settings import Settings
from taskq.store import Store, WorkerInfo
from taskq.worker.inline import Window
from taskq.worker.outcomes import Finished
from taskq.worker.sandbox import (
    Ending,
    Raised,
    Refused,
    Returned,
    call_async,
    call_sync,
    error_text,
)
from taskq.worker.threads import HandlerThreads

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("taskq.worker")

HEARTBEAT_MAX_SECONDS = 5.0
CANCEL_GRACE_SECONDS = 5.0
# How long a cancelled async handler may take to unwind before it is abandoned.
ABANDON_AFTER_SECONDS = 5.0


# Takes a progress report: task id, attempt, fraction, details as JSON text.
Reporter = Callable[[uuid.UUID, int, float, str | None], None]


def heartbeat_interval(lease: float) -> float:
    """Seconds between a worker's heartbeats: a third of the lease, at most 5 s."""
    return min(lease / 3, HEARTBEAT_MAX_SECONDS)


@dataclass(frozen=True, slots=True)
class Stopped:
    """The worker stopped waiting for the handler, for ``reason``."""

    reason: StopReason


class Attempt:
    """A claimed attempt, from its claim until its outcome is recorded."""

    __slots__ = (
        "cancel_told", "ctx", "holds_slot", "id", "node", "number", "place", "queue", "span",
        "stopped", "task", "token", "type", "window",
    )  # fmt: skip

    def __init__(
        self,
        task: ClaimedTask,
        worker_id: str,
        progress: Reporter | None,
        window: Window | None = None,
    ) -> None:
        self.id = task.id
        self.token = task.claim_token
        self.number = task.attempts
        self.type = task.type
        self.queue = task.queue
        self.holds_slot = task.concurrency_key is not None
        self.node = task.workflow_id is not None
        report = None if progress is None else functools.partial(progress, self.id, self.number)
        self.ctx = Context(
            self.id, self.type, self.number, task.max_attempts, self.queue, worker_id,
            _report=report,
        )  # fmt: skip
        self.task: asyncio.Task[None] | None = None
        self.stopped: asyncio.Future[StopReason] = asyncio.get_running_loop().create_future()
        # Whether the handler was told of an operator's cancel request.
        self.cancel_told = False
        # The attempt's span, if its task was enqueued in a trace (taskq.tracing).
        self.span: Span | None = None
        # The open claim it began in (taskq.worker.inline), if it began inline.
        self.window = window
        # Whether it holds a thread place taken when it began, not yet used (a sync
        # handler begun inline: see Runner.begin_inline).
        self.place = False

    @property
    def committed(self) -> bool:
        """Whether its claim has committed (an inline attempt's may not have yet)."""
        return self.window is None or self.window.committed

    def stop(self, reason: StopReason) -> None:
        """Stop waiting for the handler (the first reason given wins) and tell its context."""
        if not self.stopped.done():
            self.stopped.set_result(reason)
            self.ctx.request_cancel()


class Runner:
    """Runs attempts and turns each into a :class:`~taskq.worker.outcomes.Finished`.

    Args:
        settings: lease length, maximum delay, largest result and the global backoff.
        registry: the handlers.
        worker_id: recorded on claims and heartbeats.
        metrics: the worker's metrics.
        threads: where sync handlers run.
        record: takes each outcome for recording.
        release: called once per attempt whose handler is done (a free slot), unless
            its place goes to the recorder with its outcome (``keep_places``).
        progress: takes the handlers' progress reports ``(id, attempt, fraction, details)``.
        cancel_grace: seconds a handler may go on after it was told of a cancel.
        abandon_after: seconds a cancelled async handler may take to unwind.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str,
        metrics: WorkerMetrics,
        threads: HandlerThreads,
        *,
        record: Callable[[Finished], None],
        release: Callable[[], None],
        progress: Reporter | None = None,
        cancel_grace: float = CANCEL_GRACE_SECONDS,
        abandon_after: float = ABANDON_AFTER_SECONDS,
    ) -> None:
        self.cancel_grace = cancel_grace
        self.abandon_after = abandon_after
        self.registry = registry
        self.worker_id = worker_id
        self.metrics = metrics
        self.threads = threads
        self.lease = settings.lease_seconds
        self.max_delay = settings.max_delay
        self.max_result_bytes = settings.max_result_bytes
        self.max_parent_results_bytes = settings.max_parent_results_bytes
        # By claim token: one worker may hold two claims of a task at once (its
        # lease lapsed, the task came back to it while the first still runs).
        self.attempts: dict[uuid.UUID, Attempt] = {}
        # Async handlers that ignored their cancellation, still running.
        self.runaways: set[asyncio.Task[Ending]] = set()
        self._record = record
        self._release = release
        # Keep the place of an attempt that holds a concurrency slot until its outcome
        # is recorded, for the task the slot releases (the recorder's handoff, see
        # taskq.worker.outcomes): without it a buffered delivery takes the place first.
        self.keep_places = False
        self._progress = progress
        # Reads a workflow node's parents' results (the store's, set when it starts).
        self.parents: Callable[[uuid.UUID, int], Awaitable[list[str | None]]] | None = None
        self._default_backoff = backoff.from_settings(settings)
        self._backoffs: dict[str, backoff.Backoff | None] = {}
        self._children: dict[tuple[Histogram, str], Histogram] = {}
        self.tracing = tracing.Tracing.load(settings)

    def load_backoffs(self, types: list[TaskTypeRecord]) -> None:
        """Take each task type's backoff from the registry (admins may edit them)."""
        backoffs: dict[str, backoff.Backoff | None] = {}
        for task_type in types:
            try:
                text = task_type.backoff
                backoffs[task_type.name] = backoff.from_json(orjson.loads(text)) if text else None
            except ValueError as exc:
                log.warning("task type %s has an invalid backoff: %s", task_type.name, exc)
        self._backoffs = backoffs

    def begin(self, task: ClaimedTask, window: Window | None = None) -> asyncio.Task[None]:
        """Start running a claimed task (from the ``claim`` statement), inside the
        open claim ``window`` if given; returns the attempt's task."""
        return self._begin(Attempt(task, self.worker_id, self._progress, window), task)

    def begin_inline(self, task: ClaimedTask, window: Window) -> asyncio.Task[None] | None:
        """Start running ``task`` inside the open claim ``window`` if it can start
        at once: ``None`` (nothing begun) for a sync handler when no thread is free.

        Such a handler would only wait for a thread while the claim's transaction
        stays open for it, and end after the window all the same: it is begun once
        the claim has committed, as an ordinary attempt. A sync handler begun here
        takes its thread's place now, so that the window's other attempts (and
        another open claim's) cannot take it before its asyncio task runs.
        """
        handler = self.registry.get(task.type)
        place = handler is not None and handler.sync
        if place and not self.threads.take():
            return None
        attempt = Attempt(task, self.worker_id, self._progress, window)
        attempt.place = place
        return self._begin(attempt, task)

    def _begin(self, attempt: Attempt, task: ClaimedTask) -> asyncio.Task[None]:
        self.attempts[attempt.token] = attempt
        self.metrics.in_flight.inc()
        due = max(task.run_at, task.created_at)
        wait = (datetime.now(UTC) - due).total_seconds()
        self._child(self.metrics.queue_wait, attempt.queue).observe(max(0.0, wait))
        if task.traceparent is not None and self.tracing is not None:
            attempt.span = self.tracing.attempt(task)
        if attempt.span is None:
            attempt.task = asyncio.create_task(self._execute(attempt, task))
        else:  # the handler runs with the attempt's span as its current span
            context = tracing.running(attempt.span)
            attempt.task = asyncio.create_task(self._execute(attempt, task), context=context)
        return attempt.task

    def abort(self, window: Window) -> None:
        """The claim of ``window`` rolled back: its attempts never were. Drop the
        outcomes it holds and stop those still running (they record nothing)."""
        for outcome in window.close(committed=False):
            self.closed(outcome.token)
            self.metrics.processed.labels(outcome.type, outcome.queue, "stale").inc()
        for attempt in list(self.attempts.values()):
            if attempt.window is window:
                attempt.stop(StopReason.LOST)

    def _child(self, histogram: Histogram, label: str) -> Histogram:
        """``histogram.labels(label)``, looked up once per label (it takes a lock each call)."""
        child = self._children.get((histogram, label))
        if child is None:
            child = self._children[histogram, label] = histogram.labels(label)
        return child

    def running(self) -> list[asyncio.Task[None]]:
        return [a.task for a in self.attempts.values() if a.task is not None and not a.task.done()]

    def interrupt(self) -> list[asyncio.Task[None]]:
        """Stop every running attempt; their tasks are given back. Returns the attempts' tasks,
        each done within :attr:`abandon_after` seconds."""
        tasks = []
        for attempt in self.attempts.values():
            if attempt.task is not None and not attempt.task.done():
                attempt.stop(StopReason.SHUTDOWN)
                tasks.append(attempt.task)
        return tasks

    def closed(self, token: uuid.UUID) -> None:
        """The outcome of the claim ``token`` is recorded: stop extending its lease."""
        self.attempts.pop(token, None)

    async def _execute(self, attempt: Attempt, task: ClaimedTask) -> None:
        started = time.perf_counter()
        # Whether the attempt's place goes to the recorder with its outcome (see
        # keep_places) instead of being freed when the handler is done.
        kept = False
        try:
            try:
                ending = await self._call(attempt, task)
            except Exception as exc:  # a bug of taskq's: the attempt still ends
                log.exception("task %s: running the attempt failed", attempt.id)
                ending = Raised(exc)
            outcome = self._outcome(attempt, ending, task.timeout_seconds)
            kept = (
                self.keep_places and attempt.holds_slot and attempt.window is None
                and outcome is not None
            )  # fmt: skip
        finally:
            if attempt.place:  # taken when it began, and not used (e.g. its payload failed)
                attempt.place = False
                self.threads.give_back()
            self._child(self.metrics.duration, attempt.type).observe(time.perf_counter() - started)
            self.metrics.in_flight.dec()
            if not kept:
                self._release()
        try:
            if attempt.span is not None:
                _end_span(attempt.span, outcome, ending)
            if outcome is None:  # the lease was lost: counted as a stale outcome
                self.closed(attempt.token)
                self.metrics.processed.labels(attempt.type, attempt.queue, "stale").inc()
            elif attempt.window is None or not attempt.window.take(outcome):
                outcome.keeps_place, kept = kept, False
                self._record(outcome)
        finally:
            if kept:  # not handed over after all
                self._release()

    async def _call(self, attempt: Attempt, task: ClaimedTask) -> Ending | Stopped:
        if task.start_at and (wait := task.start_at - time.monotonic()) > 0:
            # Claimed just before its rate limit's slot: it starts at the slot.
            await asyncio.wait([attempt.stopped], timeout=wait)
            if attempt.stopped.done():
                return Stopped(attempt.stopped.result())
        if task.workflow_id is not None and self.parents is not None:
            # A workflow node: its parents' results, read before its handler starts.
            # Too large, it fails for good; the database failing, the attempt fails
            # (retried by the type's policy, as if the handler had read them).
            try:
                results = await self.parents(task.id, self.max_parent_results_bytes)
            except ParentResultsTooLarge as exc:
                return Refused(error_text(exc))
            except StoreError as exc:
                return Raised(StoreError(f"reading its parents' results failed: {exc}"))
            attempt.ctx.workflow_id = task.workflow_id
            attempt.ctx.parent_results = [None if r is None else orjson.loads(r) for r in results]
        handler = self.registry.get(attempt.type)
        if handler is None:
            return Raised(
                NoHandler(f"no handler for task type {attempt.type!r} on {self.worker_id}")
            )
        payload = orjson.loads(task.payload)
        if handler.sync:
            return await self._call_sync(attempt, handler, payload, task.timeout_seconds)
        return await self._call_async(attempt, handler, payload, task.timeout_seconds)

    async def _call_async(
        self, attempt: Attempt, handler: Handler, payload: Any, timeout: float
    ) -> Ending | Stopped:
        call = call_async(handler.function, payload, attempt.ctx, self.max_result_bytes)
        task = asyncio.create_task(call)
        if (stop := await self._wait(attempt, task, timeout)) is None:
            if task.cancelled():  # the handler cancelled its own asyncio task
                return Raised(asyncio.CancelledError())
            return task.result()
        task.cancel()
        # Let it unwind (its finally blocks, a rollback) before the outcome is recorded.
        await asyncio.wait([task], timeout=self.abandon_after)
        if not task.done():
            self.runaways.add(task)
            task.add_done_callback(self._runaway_ended)
            self._abandoned(attempt, "task", stop)
        return Stopped(stop)

    async def _call_sync(
        self, attempt: Attempt, handler: Handler, payload: Any, timeout: float
    ) -> Ending | Stopped:
        if attempt.place:  # taken when it began inline: ours to use now
            attempt.place = False
        elif (place := self.threads.reserve()) is not None:
            # Every thread is busy: wait for one (the timeout starts when it runs).
            either: list[asyncio.Future[Any]] = [place, attempt.stopped]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if attempt.stopped.done():
                self.threads.unreserve(place)
                return Stopped(attempt.stopped.result())
        if attempt.stopped.done():  # stopped before its thread started: it never starts
            self.threads.give_back()
            return Stopped(attempt.stopped.result())
        call = functools.partial(
            call_sync, handler.function, payload, attempt.ctx, self.max_result_bytes
        )
        if attempt.span is not None:  # a thread starts with an empty context
            call = functools.partial(contextvars.copy_context().run, call)
        job = self.threads.start(call)
        if (stop := await self._wait(attempt, job.future, timeout)) is None:
            return job.future.result()
        # Python cannot stop a thread: the attempt ends now, the thread runs on.
        if self.threads.abandon(job):
            self._abandoned(attempt, "thread", stop)
        return Stopped(stop)

    @staticmethod
    async def _wait(
        attempt: Attempt, call: asyncio.Future[Any], timeout: float
    ) -> StopReason | None:
        """Wait until ``call`` is done (``None``), or the attempt stops (the reason why)."""
        timer = asyncio.get_running_loop().call_later(timeout, attempt.stop, StopReason.TIMEOUT)
        try:
            await asyncio.wait([call, attempt.stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        # A handler that finished as it was stopped keeps its outcome.
        return None if call.done() else attempt.stopped.result()

    def _abandoned(self, attempt: Attempt, kind: AbandonedKind, stop: StopReason) -> None:
        self.metrics.abandoned_total.labels(kind).inc()
        if kind == "task":  # the threads count theirs
            self.metrics.abandoned.labels("task").set(len(self.runaways))
        attempt.ctx.log.warning(
            "the handler goes on after %s: abandoned, its %s runs on unwatched", stop.after,
            "thread" if kind == "thread" else "asyncio task (it ignores cancellation)",
        )  # fmt: skip

    def _runaway_ended(self, task: asyncio.Task[Ending]) -> None:
        self.runaways.discard(task)
        self.metrics.abandoned.labels("task").set(len(self.runaways))

    def _outcome(
        self, attempt: Attempt, ending: Ending | Stopped, timeout: float
    ) -> Finished | None:
        ctx = attempt.ctx
        if isinstance(ending, Returned):
            return self._finished(OutcomeKind.COMPLETE, attempt, result=ending.json)
        if isinstance(ending, Refused):
            return self._failure(attempt, ending.reason, final=True)
        if isinstance(ending, Stopped):
            if ending.reason is StopReason.TIMEOUT:
                error = f"TimeoutError: the handler exceeded its timeout of {timeout:g}s"
                ctx.log.warning("attempt failed: %s", error)
                return self._failure(attempt, error)
            if ending.reason is StopReason.SHUTDOWN:
                ctx.log.info("interrupted by shutdown: giving the task back")
                return self._finished(OutcomeKind.GIVE_BACK, attempt)
            if ending.reason is StopReason.CANCEL:
                ctx.log.info("stopped after a cancel was requested")
                return self._finished(OutcomeKind.CANCEL, attempt)
            return None  # lost: another claim owns the task now; record nothing
        exc = ending.error
        if isinstance(exc, Retry):
            return self._failure(attempt, error_text(exc, exc.reason), exc.delay)
        if isinstance(exc, Fail):
            return self._failure(attempt, error_text(exc, exc.reason), final=True)
        error = error_text(exc)
        ctx.log.warning(
            "attempt failed: %s", error, exc_info=None if isinstance(exc, NoHandler) else exc
        )
        return self._failure(attempt, error)

    def _finished(
        self,
        kind: OutcomeKind,
        attempt: Attempt,
        *,
        result: str | None = None,
        error: str | None = None,
        delay: float = 0.0,
    ) -> Finished:
        return Finished(
            kind, attempt.id, attempt.token, attempt.number, attempt.type, attempt.queue,
            result, error, delay, holds_slot=attempt.holds_slot, node=attempt.node,
        )  # fmt: skip

    def _failure(
        self,
        attempt: Attempt,
        error: str,
        delay: float | None = None,
        *,
        final: bool = False,
    ) -> Finished:
        """A retry after the backoff (or ``delay``), or a failure if ``final`` or none is left."""
        ctx = attempt.ctx
        if final or ctx.last_attempt:
            # A handler's Fail is its decision, not an error of the worker's.
            ctx.log.log(logging.WARNING if final else logging.ERROR, "task failed: %s", error)
            return self._finished(OutcomeKind.FAIL, attempt, error=error)
        if delay is None:
            delay = self._backoff(attempt.type).delay(attempt.number)
        delay = min(delay, self.max_delay)
        ctx.log.info("retrying in %gs: %s", delay, error)
        return self._finished(OutcomeKind.RETRY, attempt, error=error, delay=delay)

    def _backoff(self, task_type: str) -> backoff.Backoff:
        strategy = self._backoffs.get(task_type)
        if strategy is None:
            handler = self.registry.get(task_type)
            strategy = handler.backoff if handler is not None else None
        return strategy or self._default_backoff

    async def heartbeat_loop(self, store: Store, worker: WorkerInfo) -> None:
        """Every heartbeat interval, in one statement: record the worker alive and
        extend the leases of its claims; then stop the lost attempts and pass on
        cancel requests."""
        while True:
            await asyncio.sleep(worker.heartbeat_seconds)
            # Not those whose claim is still open: their rows are locked until it commits.
            attempts = [a for a in self.attempts.values() if a.committed]
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
                    log.warning("task %s: lease lost, stopping its attempt", attempt.id)
                    attempt.stop(StopReason.LOST)
                elif held[attempt.token] and not attempt.cancel_told:
                    log.info("task %s: cancel requested, telling its handler", attempt.id)
                    attempt.cancel_told = True
                    attempt.ctx.request_cancel()
                    loop = asyncio.get_running_loop()
                    loop.call_later(self.cancel_grace, self._stop_cancelled, attempt)

    @staticmethod
    def _stop_cancelled(attempt: Attempt) -> None:
        """The grace after a cancel request is over: stop a handler still running."""
        if attempt.task is not None and not attempt.task.done() and not attempt.stopped.done():
            log.info("task %s: the handler did not stop within the grace; stopping it", attempt.id)
            attempt.stop(StopReason.CANCEL)


def _end_span(span: Span, outcome: Finished | None, ending: Ending | Stopped) -> None:
    """End an attempt's span with its outcome (None: the lease was lost) and the
    exception its handler raised, unless that asked for a retry or a failure."""
    error = ending.error if isinstance(ending, Raised) else None
    raised = None if isinstance(error, Retry | Fail) else error
    if outcome is None:
        tracing.ended(span, None, raised=raised)
    else:
        tracing.ended(span, outcome.kind, outcome.error, outcome.delay, raised)
