"""The outcome recorder never holds a lease for ever: an outcome it cannot write is given
up; the room it borrows for the tasks freed slots release always goes back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from taskq.errors import StoreError
from taskq.metrics import WorkerMetrics
from taskq.model import ClaimedTask, Handoff, OutcomeKind, OwedPublish, TaskStatus
from taskq.worker import outcomes
from taskq.worker.outcomes import Finished, Recorder
from tests.support.worker_fixtures import poll


class Failing:
    """A store whose outcome statements all fail as if the database were away."""

    def __init__(self) -> None:
        self.tries = 0

    async def complete(
        self, items: Any, *, holds_slots: bool = False, handoff: Any = None, nodes: bool = False
    ) -> Any:
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

    async def retry(
        self, items: Any, *, holds_slots: bool = False, handoff: Any = None
    ) -> list[OwedPublish]:
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


class Releasing:
    """A store whose successes free slots that release one task each, claimed for the
    handoff; with ``fail`` set, the statement fails instead (nothing claimed)."""

    def __init__(self, fail: bool) -> None:
        self.broken = fail
        self.calls: list[tuple[bool, Handoff | None]] = []
        self.nodes: list[bool] = []
        self.failed: list[tuple[bool, Handoff | None]] = []

    async def complete(
        self,
        items: Any,
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
        nodes: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        self.calls.append((holds_slots, handoff))
        self.nodes.append(nodes)
        if self.broken:
            raise StoreError("database error: the statement failed")
        if handoff is not None:
            now = datetime.now(UTC)
            handoff.claimed = [
                ClaimedTask(uuid.uuid4(), "t", "default", "{}", 1, 3, 30.0, now, now, uuid.uuid4())
                for _ in range(min(handoff.room, len(items)))
            ]
        return {item[0]: TaskStatus.SUCCEEDED for item in items}

    async def fail(
        self, items: Any, *, holds_slots: bool = False, handoff: Handoff | None = None
    ) -> list[Any]:
        self.failed.append((holds_slots, handoff))
        return []


class Lender:
    """The claimer's side, with no free place of its own: the room lent is the places
    the attempts kept; each comes back as a task begun or a place freed."""

    def __init__(self) -> None:
        self.begun, self.freed = list[ClaimedTask](), 0

    def lend(self, wanted: int, places: int) -> Handoff | None:
        room = min(wanted, places)
        if room <= 0:
            self.release(places)
            return None
        return Handoff("w", 30.0, frozenset({"default"}), room)

    def took(self, handoff: Handoff) -> None:
        self.begun += handoff.claimed
        self.release(handoff.room - len(handoff.claimed))

    def release(self, slots: int = 1) -> None:
        self.freed += slots


@pytest.mark.parametrize("fail", [False, True])
async def test_outcomes_freeing_slots_borrow_room_and_always_give_back_what_they_did_not_use(
    monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    monkeypatch.setattr(outcomes, "GIVE_UP_SECONDS", 0.0)
    monkeypatch.setattr(outcomes, "RETRY_SECONDS", 0.01)
    store, lender, settled = Releasing(fail), Lender(), list[uuid.UUID]()
    recorder = Recorder(cast(Any, store), cast(Any, None), WorkerMetrics(), settled.append)
    recorder.handoffs = lender
    await recorder.start()
    try:
        plain = Finished(OutcomeKind.COMPLETE, uuid.uuid4(), uuid.uuid4(), 1, "t", "default")
        recorder.add(plain)
        await poll(lambda: len(settled) == 1, "the outcome was not closed")
        # Two attempts that held slots, one of which kept its worker place for the
        # task its slot may release (a worker with no other room).
        freeing = [
            Finished(OutcomeKind.COMPLETE, uuid.uuid4(), uuid.uuid4(), 1, "t", "default",
                     holds_slot=True, keeps_place=keeps)
            for keeps in (True, False)
        ]  # fmt: skip
        for item in freeing:
            recorder.add(item)
        await poll(lambda: len(settled) == 3, "the outcomes were not closed")
    finally:
        await recorder.stop(1.0)
    # An outcome holding no slot borrows nothing; those holding slots lend their kept
    # place as the room for what they release (once, whatever the retries), and every
    # place comes back: as a task begun, or freed.
    calls = [(slots, handoff is not None) for slots, handoff in store.calls]
    assert calls[0] == (False, False) and (True, True) in calls and (False, True) not in calls
    assert (len(lender.begun), lender.freed) == ((0, 1) if fail else (1, 0))
    assert not any(item.keeps_place for item in freeing)


async def test_a_workflow_nodes_success_borrows_room_for_the_children_it_releases() -> None:
    store, lender, settled = Releasing(False), Lender(), list[uuid.UUID]()
    recorder = Recorder(cast(Any, store), cast(Any, None), WorkerMetrics(), settled.append)
    recorder.handoffs = lender
    await recorder.start()
    try:
        # A node holding no slot, whose attempt kept its place (so that the lender,
        # which has no free place of its own here, has room to lend).
        node = Finished(OutcomeKind.COMPLETE, uuid.uuid4(), uuid.uuid4(), 1, "t", "default",
                        node=True, keeps_place=True)  # fmt: skip
        recorder.add(node)
        await poll(lambda: len(settled) == 1, "the outcome was not closed")
        # A node's failure releases nothing: nothing is lent.
        failed = Finished(OutcomeKind.FAIL, uuid.uuid4(), uuid.uuid4(), 1, "t", "default",
                          error="e", node=True)  # fmt: skip
        recorder.add(failed)
        await poll(lambda: len(settled) == 2, "the failure was not closed")
    finally:
        await recorder.stop(1.0)
    [(slots, handoff)] = store.calls
    assert (slots, store.nodes) == (False, [True])
    assert store.failed == [(False, None)]
    assert handoff is not None and handoff.room == 1
    assert (len(lender.begun), lender.freed) == (1, 0)
