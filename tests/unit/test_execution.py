"""The runner's outcomes, without services: why an attempt ended decides what is recorded.

A handler's return, ``Retry``, ``Fail`` or exception; the worker stopping to wait for
it on its timeout (a failed attempt), a shutdown (the task given back), an operator's
cancel after its grace (CANCELLED) or a lost lease (nothing recorded); and the
backoff a retry waits (the type's row, else the handler's, else the global one).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from taskq.errors import ParentResultsTooLarge, StoreError
from taskq.handlers import Context, Fail, Registry, Retry
from taskq.metrics import WorkerMetrics
from taskq.model import ClaimedTask, OutcomeKind, StopReason, TaskTypeRecord
from taskq.store import WorkerInfo
from taskq.worker.execution import Attempt, Runner
from taskq.worker.inline import Window
from taskq.worker.outcomes import Finished
from taskq.worker.threads import HandlerThreads
from tests.support.services import make_settings
from tests.support.worker_fixtures import poll


def claimed(
    task_type: str,
    attempt: int = 1,
    max_attempts: int = 3,
    timeout: float = 10.0,
    concurrency_key: str | None = None,
) -> ClaimedTask:
    """A row of ``task_type`` as the ``claim`` statement returns it."""
    now = datetime.now(UTC)
    return ClaimedTask(
        id=uuid.uuid4(), type=task_type, queue="default", payload="{}", attempts=attempt,
        max_attempts=max_attempts, timeout_seconds=timeout, run_at=now, created_at=now,
        claim_token=uuid.uuid4(), concurrency_key=concurrency_key,
    )  # fmt: skip


class Running:
    """A runner whose outcomes are collected, and the attempts it began."""

    def __init__(self, registry: Registry, **settings: Any) -> None:
        self.recorded: list[Finished] = []
        self.released = 0
        self.threads = HandlerThreads(2)
        self.runner = Runner(
            make_settings(**settings),
            registry,
            "w1",
            WorkerMetrics(),
            self.threads,
            record=self.recorded.append,
            release=self._release,
            cancel_grace=0.05,
            abandon_after=0.5,
        )

    def _release(self) -> None:
        self.released += 1

    def begin(
        self,
        task_type: str,
        *,
        attempt: int = 1,
        max_attempts: int = 3,
        timeout: float = 10.0,
        window: Window | None = None,
        concurrency_key: str | None = None,
    ) -> Attempt:
        """Run a claimed row of ``task_type`` (attempt ``attempt`` of ``max_attempts``),
        inside the open claim ``window`` if given."""
        task = claimed(task_type, attempt, max_attempts, timeout, concurrency_key)
        self.runner.begin(task, window)
        return self.runner.attempts[task.claim_token]

    async def ended(self, attempt: Attempt) -> Finished | None:
        """Wait for the attempt's end; its outcome, or None if nothing was recorded."""
        assert attempt.task is not None
        await asyncio.wait_for(attempt.task, 5)
        found = [f for f in self.recorded if f.token == attempt.token]
        assert len(found) <= 1
        return found[0] if found else None

    def stale(self) -> float:
        labels = {"type": "slow", "queue": "default", "outcome": "stale"}
        value = self.runner.metrics.registry.get_sample_value("taskq_tasks_processed_total", labels)
        return value or 0.0


RELEASE = threading.Event()
SYNC_CALLS: list[int] = []  # the attempts "ok.sync" ran


def handlers(backoff: Any = 7) -> Registry:
    """Handlers that return, raise, and one of each kind that waits until it is stopped."""
    registry = Registry()

    @registry.task("ok", backoff=backoff)
    async def ok(payload: dict[str, Any], ctx: Context) -> dict[str, int]:
        return {"attempt": ctx.attempt}

    @registry.task("retry", backoff=backoff)
    async def retry(payload: dict[str, Any], ctx: Context) -> None:
        raise Retry(delay=3, reason="the API said 429")

    @registry.task("retry.far", backoff=backoff)
    async def retry_far(payload: dict[str, Any], ctx: Context) -> None:
        raise Retry(delay=10**9)

    @registry.task("retry.backoff", backoff=backoff)
    async def retry_backoff(payload: dict[str, Any], ctx: Context) -> None:
        raise Retry()

    @registry.task("fail", backoff=backoff)
    async def fail(payload: dict[str, Any], ctx: Context) -> None:
        raise Fail("the card was declined")

    @registry.task("raise", backoff=backoff)
    async def raises(payload: dict[str, Any], ctx: Context) -> None:
        raise ValueError("boom")

    @registry.task("slow", backoff=backoff)
    async def slow(payload: dict[str, Any], ctx: Context) -> None:
        await asyncio.sleep(30)  # cancelled when the worker stops waiting

    @registry.task("ok.sync", backoff=backoff)
    def ok_sync(payload: dict[str, Any], ctx: Context) -> None:
        SYNC_CALLS.append(ctx.attempt)

    @registry.task("slow.sync", backoff=backoff)
    def slow_sync(payload: dict[str, Any], ctx: Context) -> None:
        # Goes on after the worker stops waiting (it is abandoned) until the test ends:
        # one returning as it is stopped would keep its own outcome.
        RELEASE.wait(5)

    return registry


@pytest.fixture
def running() -> Iterator[Running]:
    RELEASE.clear()
    SYNC_CALLS.clear()
    value = Running(handlers())
    yield value
    RELEASE.set()  # the abandoned sync handlers end
    value.threads.close()


# ------------------------------------------------------------ what the handler ended with


async def test_a_return_completes_with_the_json_result(running: Running) -> None:
    done = await running.ended(running.begin("ok", attempt=2))
    assert done is not None
    assert (done.kind, done.result, done.error, done.attempt) == (
        OutcomeKind.COMPLETE,
        '{"attempt":2}',
        None,
        2,
    )
    assert running.released == 1


@pytest.mark.parametrize("keep_places", [False, True])
async def test_an_attempt_holding_a_slot_hands_its_place_to_the_recorder(
    running: Running, keep_places: bool
) -> None:
    # With keep_places (a worker that hands tasks over), the place of an attempt that
    # holds a concurrency slot goes with its outcome; any other attempt frees its own.
    running.runner.keep_places = keep_places
    held = await running.ended(running.begin("ok", concurrency_key="a"))
    plain = await running.ended(running.begin("ok"))
    assert held is not None and plain is not None
    assert (held.holds_slot, held.keeps_place) == (True, keep_places)
    assert (plain.holds_slot, plain.keeps_place) == (False, False)
    assert running.released == (1 if keep_places else 2)


async def test_retry_asks_for_its_delay_and_fail_ends_the_task(running: Running) -> None:
    retry = await running.ended(running.begin("retry"))
    assert retry is not None
    assert (retry.kind, retry.error, retry.delay) == (
        OutcomeKind.RETRY,
        "Retry: the API said 429",
        3.0,
    )
    fail = await running.ended(running.begin("fail"))  # attempts left, but Fail is final
    assert fail is not None
    assert (fail.kind, fail.error) == (OutcomeKind.FAIL, "Fail: the card was declined")


async def test_a_retry_waits_at_most_the_longest_delay(running: Running) -> None:
    done = await running.ended(running.begin("retry.far"))
    assert done is not None
    assert (done.kind, done.delay) == (OutcomeKind.RETRY, make_settings().max_delay)


async def test_an_exception_retries_after_the_backoff_until_the_last_attempt(
    running: Running,
) -> None:
    retried = await running.ended(running.begin("raise", attempt=2, max_attempts=3))
    assert retried is not None
    assert (retried.kind, retried.error, retried.delay) == (
        OutcomeKind.RETRY,
        "ValueError: boom",
        7.0,
    )
    failed = await running.ended(running.begin("raise", attempt=3, max_attempts=3))
    assert failed is not None
    assert (failed.kind, failed.error) == (OutcomeKind.FAIL, "ValueError: boom")


async def test_a_type_without_a_handler_fails_its_attempt(running: Running) -> None:
    done = await running.ended(running.begin("nobody.handles.this"))
    assert done is not None
    assert done.kind == OutcomeKind.RETRY
    assert done.error == "NoHandler: no handler for task type 'nobody.handles.this' on w1"


# --------------------------------------------------------- why the worker stopped waiting


@pytest.mark.parametrize("task_type", ["slow", "slow.sync"])
async def test_a_timeout_fails_the_attempt_saying_so(running: Running, task_type: str) -> None:
    attempt = running.begin(task_type, timeout=0.05)
    done = await running.ended(attempt)
    assert done is not None
    assert (done.kind, done.delay) == (OutcomeKind.RETRY, 7.0)
    assert done.error == "TimeoutError: the handler exceeded its timeout of 0.05s"
    assert attempt.ctx.cancel_requested  # told, so a sync handler can end its thread
    last = await running.ended(running.begin(task_type, attempt=3, timeout=0.05))
    assert last is not None
    assert (last.kind, last.error) == (OutcomeKind.FAIL, done.error)


@pytest.mark.parametrize("task_type", ["slow", "slow.sync"])
async def test_a_shutdown_gives_the_task_back(running: Running, task_type: str) -> None:
    attempt = running.begin(task_type)
    await asyncio.sleep(0.02)
    assert running.runner.interrupt() == [attempt.task]
    done = await running.ended(attempt)
    assert done is not None
    assert (done.kind, done.error) == (OutcomeKind.GIVE_BACK, None)


class Heartbeats:
    """A store whose heartbeat answers ``held`` (token -> cancel requested)."""

    def __init__(self, held: dict[uuid.UUID, bool]) -> None:
        self.held = held
        self.beats = 0
        self.extended: list[set[uuid.UUID]] = []  # the tokens each heartbeat named

    async def heartbeat(self, claims: Any, worker: WorkerInfo, lease: float) -> Any:
        self.beats += 1
        self.extended.append({token for _, token in claims})
        return self.held


@contextlib.asynccontextmanager
async def beating(running: Running, store: Heartbeats) -> AsyncIterator[None]:
    worker = WorkerInfo("w1", "host", 1, ["default"], 2, 2, 0.01)
    task = asyncio.create_task(running.runner.heartbeat_loop(cast(Any, store), worker))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_cancel_is_told_then_after_its_grace_records_cancelled(running: Running) -> None:
    attempt = running.begin("slow")
    store = Heartbeats({attempt.token: True})
    async with beating(running, store):
        await poll(lambda: attempt.ctx.cancel_requested, "the handler was never told")
        done = await running.ended(attempt)
    assert done is not None
    assert (done.kind, done.error) == (OutcomeKind.CANCEL, None)


async def test_a_lost_lease_stops_the_attempt_and_records_nothing(running: Running) -> None:
    attempt = running.begin("slow")
    store = Heartbeats({})  # the claim is not held any more
    async with beating(running, store):
        assert await running.ended(attempt) is None
    assert running.stale() == 1
    assert attempt.token not in running.runner.attempts  # its lease is not extended
    assert running.released == 1


async def test_the_first_reason_to_stop_wins(running: Running) -> None:
    attempt = running.begin("slow")
    attempt.stop(StopReason.SHUTDOWN)
    attempt.stop(StopReason.TIMEOUT)
    done = await running.ended(attempt)
    assert done is not None and done.kind == OutcomeKind.GIVE_BACK


# ------------------------------------------------------------------------------- backoff


def type_row(name: str, backoff: str | None) -> TaskTypeRecord:
    """A row of the task type registry with this ``backoff`` (JSON text)."""
    now = datetime.now(UTC)
    return TaskTypeRecord(name, "default", 3, 10.0, backoff, None, True, now, now)


async def test_the_backoff_of_a_type_row_wins_over_the_handlers() -> None:
    running = Running(handlers(backoff=7))
    try:
        running.runner.load_backoffs(
            [
                type_row("raise", '{"strategy": "fixed", "delay": 11}'),
                type_row("retry.backoff", None),  # no row backoff: the handler's
                type_row("ok", '{"strategy": "nonsense"}'),  # ignored, logged
            ]
        )
        from_row = await running.ended(running.begin("raise"))
        from_handler = await running.ended(running.begin("retry.backoff"))
    finally:
        running.threads.close()
    assert from_row is not None and from_row.delay == 11.0
    assert from_handler is not None and from_handler.delay == 7.0


async def test_without_a_backoff_of_its_own_a_type_takes_the_global_one() -> None:
    running = Running(handlers(backoff=None), backoff_strategy="fixed", backoff_fixed="13s")
    try:
        done = await running.ended(running.begin("raise"))
    finally:
        running.threads.close()
    assert done is not None and done.delay == 13.0


async def test_the_heartbeat_leaves_out_attempts_whose_claim_is_still_open(
    running: Running,
) -> None:
    # Their rows are locked by the open claim: a heartbeat would wait for its commit,
    # and find nothing held before it (ENQUEUED), so it must not stop them as lost.
    window = Window()
    inline = running.begin("slow", window=window)
    ordinary = running.begin("slow")
    store = Heartbeats({ordinary.token: False})
    async with beating(running, store):
        await poll(lambda: store.beats >= 2, "no heartbeat")
        assert not inline.stopped.done()
        assert all(tokens == {ordinary.token} for tokens in store.extended)
        window.close(committed=True)
        store.held[inline.token] = False
        beats = store.beats
        await poll(lambda: store.beats > beats + 1, "no heartbeat after the commit")
    assert store.extended[-1] == {inline.token, ordinary.token}
    running.runner.interrupt()


async def test_an_inline_outcome_waits_in_its_window_and_a_rollback_records_nothing(
    running: Running,
) -> None:
    window = Window()
    quick = running.begin("ok", window=window)
    slow = running.begin("slow", window=window)
    assert quick.task is not None
    await asyncio.wait_for(quick.task, 5)
    assert [f.token for f in window.outcomes] == [quick.token] and running.recorded == []
    running.runner.abort(window)  # the claim rolled back
    assert await running.ended(slow) is None  # stopped, nothing recorded
    assert running.recorded == [] and running.runner.attempts == {}
    assert running.stale() == 1  # the slow one's; the quick one's is counted under "ok"
    assert running.released == 2


async def test_a_sync_handler_begins_inline_only_with_a_thread_free_for_it(
    running: Running,
) -> None:
    # Two threads. A third sync handler would wait for one while the claim stays
    # open: it is not begun in the window (the claimer begins it after the commit).
    window, runner = Window(), running.runner
    tasks = [claimed("slow.sync") for _ in range(3)]
    begun = [runner.begin_inline(task, window) for task in tasks]
    assert [task is not None for task in begun] == [True, True, False]
    assert tasks[2].claim_token not in runner.attempts
    assert runner.begin_inline(claimed("slow"), window) is not None  # async: needs no thread
    # The places were taken as they began, before their asyncio tasks ran.
    assert not running.threads.take()
    runner.interrupt()


async def test_an_inline_sync_attempt_stopped_before_its_thread_starts_never_runs(
    running: Running,
) -> None:
    window, task = Window(), claimed("ok.sync")
    assert running.runner.begin_inline(task, window) is not None
    attempt = running.runner.attempts[task.claim_token]
    running.runner.abort(window)  # the claim rolled back before the attempt's task ran
    assert await running.ended(attempt) is None
    assert SYNC_CALLS == []  # the handler never ran
    assert running.threads.take() and running.threads.take()  # both places are back


# ------------------------------------------------------------ a start at a rate limit's slot


async def test_a_task_claimed_before_its_slot_runs_its_handler_at_the_slot() -> None:
    started: list[float] = []
    registry = Registry()

    @registry.task("stamp")
    async def stamp(payload: dict[str, Any], ctx: Context) -> None:
        started.append(asyncio.get_running_loop().time())

    running = Running(registry)
    try:
        begun = asyncio.get_running_loop().time()
        task = claimed("stamp")._replace(start_at=time.monotonic() + 0.2)
        running.runner.begin(task)
        attempt = running.runner.attempts[task.claim_token]
        done = await running.ended(attempt)
        assert done is not None and done.kind is OutcomeKind.COMPLETE
        # Not before its start (the loop's timers may fire a millisecond early).
        assert started[0] - begun >= 0.2 - 0.002
    finally:
        running.threads.close()


async def test_a_shutdown_before_the_slot_gives_the_task_back_unrun(running: Running) -> None:
    task = claimed("ok")._replace(start_at=time.monotonic() + 30.0)
    running.runner.begin(task)
    attempt = running.runner.attempts[task.claim_token]
    assert running.runner.interrupt() == [attempt.task]
    done = await running.ended(attempt)
    assert done is not None
    assert (done.kind, done.error) == (OutcomeKind.GIVE_BACK, None)
    assert running.released == 1


# ------------------------------------------------------------ a workflow node's parents


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (
            StoreError("the database is down"),
            OutcomeKind.RETRY,
            "StoreError: reading its parents' results failed: the database is down",
        ),
        (
            ParentResultsTooLarge(5000, 100),
            OutcomeKind.FAIL,
            "ParentResultsTooLarge: its parents' results are 5000 bytes of JSON, more than"
            " TASKQ_MAX_PARENT_RESULTS_BYTES (100)",
        ),
    ],
)
async def test_a_node_whose_parents_results_cannot_be_read_does_not_run(
    running: Running, error: Exception, kind: OutcomeKind, message: str
) -> None:
    # The database failing is a failed attempt, retried by the type's policy; results
    # too large to read fail the node for good. The handler never runs either way.
    asked: list[tuple[uuid.UUID, int]] = []

    async def parents(task_id: uuid.UUID, max_bytes: int) -> list[str | None]:
        asked.append((task_id, max_bytes))
        raise error

    running.runner.parents = parents
    task = claimed("ok")._replace(workflow_id=uuid.uuid4())
    running.runner.begin(task)
    done = await running.ended(running.runner.attempts[task.claim_token])
    assert done is not None
    assert (done.kind, done.error) == (kind, message)
    assert asked == [(task.id, make_settings().max_parent_results_bytes)]


async def test_a_node_reads_its_parents_results_before_its_handler() -> None:
    seen: list[Any] = []
    registry = Registry()

    @registry.task("node")
    async def node(payload: dict[str, Any], ctx: Context) -> None:
        seen.append((ctx.workflow_id, ctx.parent_results))

    running = Running(registry)

    async def parents(task_id: uuid.UUID, max_bytes: int) -> list[str | None]:
        return ['{"a":1}', None, "[2]"]

    running.runner.parents = parents
    try:
        task = claimed("node")._replace(workflow_id=uuid.uuid4())
        running.runner.begin(task)
        done = await running.ended(running.runner.attempts[task.claim_token])
        assert done is not None and done.kind is OutcomeKind.COMPLETE
        assert seen == [(task.workflow_id, [{"a": 1}, None, [2]])]
    finally:
        running.threads.close()
