"""The outcome recorder never holds a lease for ever: an outcome it cannot write is given up."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest

from taskq.errors import StoreError
from taskq.metrics import WorkerMetrics
from taskq.model import OutcomeKind, OwedPublish, TaskStatus
from taskq.worker import outcomes
from taskq.worker.outcomes import Finished, Recorder
from tests.support.worker_fixtures import poll


class Failing:
    """A store whose outcome statements all fail as if the database were away."""

    def __init__(self) -> None:
        self.tries = 0

    async def complete(self, items: Any, *, holds_slots: bool = False) -> Any:
        self.tries += 1
        raise StoreError("database error: connection refused")


async def test_an_outcome_that_cannot_be_written_is_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outcomes, "GIVE_UP_SECONDS", 0.5)
    monkeypatch.setattr(outcomes, "RETRY_SECONDS", 0.05)
    store, closed = Failing(), list[uuid.UUID]()
    recorder = Recorder(cast(Any, store), cast(Any, None), WorkerMetrics(), closed.append)
    await recorder.start()
    try:
        token = uuid.uuid4()
        recorder.add(
            Finished(OutcomeKind.COMPLETE, uuid.uuid4(), token, 1, "t", "default", result="null")
        )
        # Retried while the heartbeat keeps the lease; then closed, so the heartbeat
        # lets the lease run out and the sweeper takes the task back.
        await poll(lambda: closed == [token], "the outcome was never given up")
        assert store.tries > 1
        tries = store.tries
        await poll(lambda: recorder._idle.is_set(), "the recorder kept the outcome")
        assert store.tries == tries
    finally:
        await recorder.stop(1.0)


class Recording:
    """A store whose retries are recorded: the first task's, and the second's CANCELLED (a
    cancel was requested meanwhile); any other id was stale."""

    def __init__(self, retried: uuid.UUID, cancelled: uuid.UUID) -> None:
        self.retried, self.cancelled = retried, cancelled

    async def retry(self, items: Any, *, holds_slots: bool = False) -> list[OwedPublish]:
        return [
            OwedPublish(self.retried, "t", "default", TaskStatus.ENQUEUED, 1, None, 2, 5.0),
            OwedPublish(self.cancelled, "t", "default", TaskStatus.CANCELLED, 1, None, 2, 0.0),
        ]


class Outbox:
    def __init__(self) -> None:
        self.submitted: list[OwedPublish] = []

    def submit(self, owed: OwedPublish) -> bool:
        self.submitted.append(owed)
        return True


async def test_a_recorded_retry_goes_to_the_outbox_and_a_cancelled_one_does_not() -> None:
    retried, cancelled, stale = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store, outbox, closed = Recording(retried, cancelled), Outbox(), list[uuid.UUID]()
    metrics = WorkerMetrics()
    recorder = Recorder(cast(Any, store), cast(Any, outbox), metrics, closed.append)
    await recorder.start()
    try:
        tokens = [uuid.uuid4() for _ in range(3)]
        for task_id, token in zip((retried, cancelled, stale), tokens, strict=True):
            recorder.add(
                Finished(OutcomeKind.RETRY, task_id, token, 1, "t", "default", error="e", delay=5)
            )
        await poll(lambda: len(closed) == 3, "the attempts were not closed")
    finally:
        await recorder.stop(1.0)
    assert [owed.id for owed in outbox.submitted] == [retried]
    assert sorted(closed) == sorted(tokens)
    processed = "taskq_tasks_processed_total"
    sample = metrics.registry.get_sample_value
    labels = {"type": "t", "queue": "default"}
    assert sample(processed, {**labels, "outcome": "retried"}) == 1
    assert sample(processed, {**labels, "outcome": "cancelled"}) == 1
    assert sample(processed, {**labels, "outcome": "stale"}) == 1
