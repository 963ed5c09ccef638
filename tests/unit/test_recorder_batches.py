"""The outcome recorder through a fake store and outbox: a batch whose statement fails is
written one outcome at a time, so one bad outcome holds back none of the others; stale
and cancelled outcomes publish nothing."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from taskq.errors import RejectedByDatabase, StoreError
from taskq.metrics import WorkerMetrics
from taskq.model import OutcomeKind, OwedPublish, TaskStatus
from taskq.worker import outcomes
from taskq.worker.outcomes import Finished, Recorder
from tests.support.worker_fixtures import poll


@dataclass
class Store:
    """Records each statement's ids; an outcome in ``bad`` fails every statement of its
    kind it is in.

    Recorded rows are SUCCEEDED, ENQUEUED or FAILED by kind; ids in ``stale`` are left
    out of the answer (their claim was taken over), ids in ``cancelled`` come back
    CANCELLED (an operator's cancel won).
    """

    bad: dict[tuple[OutcomeKind, uuid.UUID], StoreError] = field(default_factory=dict)
    stale: set[uuid.UUID] = field(default_factory=set)
    cancelled: set[uuid.UUID] = field(default_factory=set)
    calls: list[tuple[OutcomeKind, list[uuid.UUID]]] = field(default_factory=list)

    def _statement(
        self, kind: OutcomeKind, status: TaskStatus, items: Sequence[tuple[Any, ...]]
    ) -> list[OwedPublish]:
        """The rows recorded, as the store answers the statements that owe a publish
        (a failure's error is its ``last_error``)."""
        ids = [item[0] for item in items]
        self.calls.append((kind, ids))
        for task_id in ids:
            if (kind, task_id) in self.bad:
                raise self.bad[kind, task_id]
        return [
            OwedPublish(
                item[0], "t", "default",
                TaskStatus.CANCELLED if item[0] in self.cancelled else status, 1,
                item[2] if kind is not OutcomeKind.COMPLETE else None, 1, 9.0,
            )
            for item in items if item[0] not in self.stale
        ]  # fmt: skip

    async def complete(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
        handoff: Any = None,
        nodes: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        recorded = self._statement(OutcomeKind.COMPLETE, TaskStatus.SUCCEEDED, items)
        return {owed.id: owed.status for owed in recorded}

    async def retry(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str, float]],
        *,
        holds_slots: bool = False,
        handoff: Any = None,
    ) -> list[OwedPublish]:
        return self._statement(OutcomeKind.RETRY, TaskStatus.ENQUEUED, items)

    async def fail(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
        handoff: Any = None,
    ) -> list[OwedPublish]:
        return self._statement(OutcomeKind.FAIL, TaskStatus.FAILED, items)


@dataclass
class Outbox:
    owed: list[OwedPublish] = field(default_factory=list)

    def submit(self, owed: OwedPublish) -> bool:
        self.owed.append(owed)
        return True


def finished(kind: OutcomeKind, **fields: Any) -> Finished:
    return Finished(kind, uuid.uuid4(), uuid.uuid4(), 1, "t", "default", **fields)


def processed(metrics: WorkerMetrics, outcome: str) -> float:
    labels = {"type": "t", "queue": "default", "outcome": outcome}
    return metrics.registry.get_sample_value("taskq_tasks_processed_total", labels) or 0.0


async def record(store: Store, items: list[Finished]) -> tuple[Outbox, WorkerMetrics, list[Any]]:
    """Add ``items`` at once (one batch) and wait until the recorder is idle."""
    outbox, metrics, closed = Outbox(), WorkerMetrics(), list[uuid.UUID]()
    recorder = Recorder(cast(Any, store), cast(Any, outbox), metrics, closed.append)
    for item in items:
        recorder.add(item)
    await recorder.start()
    try:
        await poll(lambda: recorder._idle.is_set(), "the recorder kept outcomes")
    finally:
        await recorder.stop(1.0)
    return outbox, metrics, closed


async def test_a_refused_result_is_isolated_and_fails_its_task_alone() -> None:
    items = [finished(OutcomeKind.COMPLETE, result="1") for _ in range(4)]
    bad = items[2]
    store = Store(
        bad={(OutcomeKind.COMPLETE, bad.id): RejectedByDatabase("invalid input syntax for json")}
    )
    outbox, metrics, closed = await record(store, items)
    # The batch failed, so each outcome was written alone; the refused one became a failure.
    assert store.calls[0] == (OutcomeKind.COMPLETE, [i.id for i in items])
    assert sorted(store.calls[1:5]) == sorted((OutcomeKind.COMPLETE, [i.id]) for i in items)
    assert store.calls[5:] == [(OutcomeKind.FAIL, [bad.id])]
    assert processed(metrics, "succeeded") == 3 and processed(metrics, "failed") == 1
    [owed] = outbox.owed
    assert (owed.id, owed.status) == (bad.id, TaskStatus.FAILED)
    assert owed.last_error is not None
    assert owed.last_error.startswith("RejectedByDatabase: the result was refused:")
    # Every claim is closed once (the refused one after its failure was recorded).
    assert sorted(closed) == sorted(i.token for i in items)


async def test_an_outcome_failing_alone_is_retried_then_given_up_the_others_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outcomes, "GIVE_UP_SECONDS", 0.3)
    monkeypatch.setattr(outcomes, "RETRY_SECONDS", 0.02)
    items = [finished(OutcomeKind.RETRY, error="ValueError: x", delay=9.0) for _ in range(3)]
    bad = items[0]
    store = Store(bad={(OutcomeKind.RETRY, bad.id): StoreError("database error: value too long")})
    outbox, metrics, closed = await record(store, items)
    alone = [ids for kind, ids in store.calls if ids == [bad.id]]
    assert len(alone) > 2, store.calls  # retried alone, never again with the others
    assert all(bad.id not in ids or len(ids) == 1 for _, ids in store.calls[1:])
    # The others were recorded once each and their retries published.
    good = {i.id for i in items[1:]}
    assert sum(ids == [i] for _, ids in store.calls for i in good) == 2
    assert {o.id for o in outbox.owed} == good
    assert {(o.status, o.delay) for o in outbox.owed} == {(TaskStatus.ENQUEUED, 9.0)}
    assert processed(metrics, "retried") == 2
    # Given up: its claim is closed (the lease runs out), nothing is counted for it.
    assert sorted(closed) == sorted(i.token for i in items)


async def test_stale_and_cancelled_outcomes_publish_nothing() -> None:
    items = [finished(OutcomeKind.FAIL, error="ValueError: x") for _ in range(3)]
    stale, cancelled, failed = items
    store = Store(stale={stale.id}, cancelled={cancelled.id})
    outbox, metrics, closed = await record(store, items)
    assert store.calls == [(OutcomeKind.FAIL, [i.id for i in items])]  # one statement
    assert [o.id for o in outbox.owed] == [failed.id]
    assert outbox.owed[0].last_error == "ValueError: x"
    assert [processed(metrics, o) for o in ("stale", "cancelled", "failed")] == [1, 1, 1]
    assert sorted(closed) == sorted(i.token for i in items)
