"""Inline claims, through fakes of the store, the runner and the recorder.

With an inline window the claimer claims a batch in a transaction left open
while the claimed handlers start; the successes that end within the window are
written in it (``OpenClaim.complete``), the rest go to the recorder after the
commit. A redelivered delivery is never run inline; a claim that fails after
handlers began stops them and marks its deliveries so that they never run
inline again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from taskq.amqp.envelope import Envelope
from taskq.errors import StoreError
from taskq.metrics import WorkerMetrics
from taskq.model import ClaimedTask, Handoff, OutcomeKind, TaskStatus, Unclaimed
from taskq.worker import claims
from taskq.worker.claims import Claimer
from taskq.worker.consumer import Buffers, Delivery
from taskq.worker.inline import Inline, Window
from taskq.worker.outcomes import Finished
from tests.support.claiming import fake_claimer
from tests.support.worker_fixtures import poll

QUEUE = "default"


@dataclass
class Channel:
    is_closed: bool = False


def claimed(task_id: uuid.UUID) -> ClaimedTask:
    now = datetime.now(UTC)
    return ClaimedTask(task_id, "t", QUEUE, "{}", 1, 3, 10.0, now, now, uuid.uuid4())


@dataclass
class OpenClaim:
    rows: list[ClaimedTask | Unclaimed]
    store: Store

    async def complete(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
        nodes: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        self.store.completed.extend(i for i, _, _ in items)
        if self.store.complete_error is not None:
            raise self.store.complete_error
        if nodes and handoff is not None:  # each success released a child, claimed
            handoff.claimed = [claimed(uuid.uuid4()) for _ in items][: handoff.room]
        return {i: TaskStatus.SUCCEEDED for i, _, _ in items}


@dataclass
class Store:
    """Claims every id; records what its open claims completed and whether they committed."""

    complete_error: Exception | None = None
    completed: list[uuid.UUID] = field(default_factory=list)
    committed: list[bool] = field(default_factory=list)
    plain_claims: int = 0

    @asynccontextmanager
    async def claim_open(
        self, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> AsyncIterator[OpenClaim]:
        try:
            yield OpenClaim([claimed(i) for i in dict.fromkeys(ids)], self)
        except BaseException:
            self.committed.append(False)
            raise
        self.committed.append(True)

    async def claim(
        self, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> list[ClaimedTask | Unclaimed]:
        self.plain_claims += 1
        return [claimed(i) for i in dict.fromkeys(ids)]


@dataclass
class Runner:
    """Begins attempts that end at once with a success, or (for ids in ``slow``) only
    when let go; begins none for ids in ``no_thread`` (a sync handler with no free
    thread); counts those stopped because their claim rolled back."""

    slow: set[uuid.UUID] = field(default_factory=set)
    no_thread: set[uuid.UUID] = field(default_factory=set)
    begun_inline: list[uuid.UUID] = field(default_factory=list)
    aborted: list[uuid.UUID] = field(default_factory=list)
    gates: dict[uuid.UUID, asyncio.Event] = field(default_factory=dict)
    recorded: list[uuid.UUID] = field(default_factory=list)  # outcomes a window did not take
    nodes: set[uuid.UUID] = field(default_factory=set)  # workflow nodes' attempts

    def begin_inline(self, row: ClaimedTask, window: Window) -> asyncio.Task[None] | None:
        if row.id in self.no_thread:
            return None
        self.begun_inline.append(row.id)
        gate = self.gates[row.id] = asyncio.Event()
        return asyncio.create_task(self._run(row, window, gate))

    async def _run(self, row: ClaimedTask, window: Window, gate: asyncio.Event) -> None:
        if row.id in self.slow:
            await gate.wait()
        outcome = Finished(
            OutcomeKind.COMPLETE, row.id, row.claim_token, 1, "t", QUEUE, "1",
            node=row.id in self.nodes,
        )  # fmt: skip
        if not window.take(outcome):
            self.recorded.append(row.id)

    def abort(self, window: Window) -> None:
        window.close(committed=False)
        for task_id in window.begun:
            self.aborted.append(task_id)
            self.gates[task_id].set()


@dataclass
class Recorder:
    """Keeps what it is handed: outcomes written inline, and outcomes to record."""

    written: list[tuple[OutcomeKind, list[uuid.UUID], dict[uuid.UUID, Any]]] = field(
        default_factory=list
    )
    added: list[uuid.UUID] = field(default_factory=list)
    handoffs: Any = None  # the claimer, as the worker wires it

    def close_attempts(self, kind: OutcomeKind, items: Sequence[Finished], recorded: Any) -> None:
        self.written.append((kind, [i.id for i in items], dict(recorded)))

    def add(self, outcome: Finished) -> None:
        self.added.append(outcome.id)


@dataclass
class Acker:
    acked: list[uuid.UUID] = field(default_factory=list)

    async def ack(self, deliveries: list[Delivery]) -> None:
        self.acked.extend(d.envelope.id for d in deliveries)


@dataclass
class Claiming:
    """A claimer with an inline window, wired to the fakes."""

    store: Store = field(default_factory=Store)
    runner: Runner = field(default_factory=Runner)
    recorder: Recorder = field(default_factory=Recorder)
    acker: Acker = field(default_factory=Acker)
    buffers: Buffers = field(default_factory=lambda: Buffers([QUEUE]))
    begun_after: list[uuid.UUID] = field(default_factory=list)
    window: float = 0.5
    claimer: Claimer = field(init=False)

    def __post_init__(self) -> None:
        inline = Inline(
            self.window, cast(Any, self.runner), cast(Any, self.recorder), WorkerMetrics()
        )
        self.claimer = fake_claimer(
            self.store, None, self.buffers, self.acker, self.begun_after_append, inline
        )
        self.recorder.handoffs = self.claimer

    def begun_after_append(self, row: ClaimedTask) -> None:
        self.begun_after.append(row.id)

    async def claim(self, deliveries: list[Delivery]) -> None:
        self.claimer._reserved += len(deliveries)  # as run() does before a claim
        self.claimer._claims += 1
        await self.claimer._claim(deliveries)


def delivery(tag: int, *, redelivered: bool = False) -> Delivery:
    envelope = Envelope(uuid.uuid4(), "t", 1)
    return Delivery(envelope, QUEUE, cast(Any, Channel()), tag, redelivered)


def test_a_window_holds_outcomes_until_closed() -> None:
    window = Window()
    token = uuid.uuid4()
    ok = Finished(OutcomeKind.COMPLETE, uuid.uuid4(), token, 1, "t", QUEUE, "1")
    retry = Finished(OutcomeKind.RETRY, uuid.uuid4(), token, 1, "t", QUEUE, error="e")
    assert window.take(ok) and window.take(retry)
    assert window.successes() == [ok]
    assert window.successes() == []
    assert window.close(committed=True) == [retry]
    assert window.committed and not window.take(ok)


@pytest.mark.parametrize("seconds", [0.0, -1.0, 1.5])
def test_an_inline_window_is_more_than_0_and_at_most_a_second(seconds: float) -> None:
    with pytest.raises(ValueError, match="inline window"):
        Inline(seconds, cast(Any, None), cast(Any, None), WorkerMetrics())


async def test_quick_successes_are_written_in_the_claim_and_the_acks_follow_the_commit() -> None:
    c = Claiming()
    batch = [delivery(1), delivery(2)]
    await c.claim(batch)
    ids = [d.envelope.id for d in batch]
    assert c.runner.begun_inline == ids and c.begun_after == []
    assert c.store.completed == ids and c.store.committed == [True]
    assert c.recorder.written == [
        (OutcomeKind.COMPLETE, ids, dict.fromkeys(ids, TaskStatus.SUCCEEDED))
    ]
    assert c.acker.acked == ids
    assert c.claimer._reserved == 2  # the attempts free their own slots


async def test_a_handler_outliving_the_window_commits_running_and_goes_to_the_recorder() -> None:
    slow, quick = delivery(1), delivery(2)
    c = Claiming(window=0.05)
    c.runner.slow.add(slow.envelope.id)
    await c.claim([slow, quick])
    assert c.store.completed == [quick.envelope.id] and c.store.committed == [True]
    assert c.acker.acked == [slow.envelope.id, quick.envelope.id]
    assert c.recorder.written[0][1] == [quick.envelope.id]
    c.runner.gates[slow.envelope.id].set()  # it ends after the commit: recorded as usual
    await poll(lambda: c.runner.recorded == [slow.envelope.id], "the late outcome was held")


async def test_a_redelivered_delivery_is_claimed_and_committed_before_it_runs() -> None:
    again, fresh = delivery(1, redelivered=True), delivery(2)
    c = Claiming()
    await c.claim([again, fresh])
    assert c.runner.begun_inline == [fresh.envelope.id]
    assert c.begun_after == [again.envelope.id]  # begun by the claimer after the commit
    assert c.store.committed == [True]


async def test_handlers_that_cannot_start_at_once_are_begun_after_the_commit() -> None:
    waiting, quick = delivery(1), delivery(2)
    c = Claiming()
    c.runner.no_thread.add(waiting.envelope.id)
    await c.claim([waiting, quick])
    assert c.runner.begun_inline == [quick.envelope.id]
    assert c.store.completed == [quick.envelope.id] and c.store.committed == [True]
    assert c.begun_after == [waiting.envelope.id]  # an ordinary attempt, after the commit
    assert c.acker.acked == [waiting.envelope.id, quick.envelope.id]


async def test_a_batch_of_redeliveries_takes_the_plain_claim() -> None:
    c = Claiming()
    await c.claim([delivery(1, redelivered=True)])
    assert c.store.plain_claims == 1 and c.store.committed == []
    assert len(c.begun_after) == 1


async def test_a_failed_inline_claim_stops_its_attempts_and_never_runs_them_inline_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claims, "STORE_RETRY_SECONDS", 0.0)
    c = Claiming(store=Store(complete_error=StoreError("connection lost")))
    batch = [delivery(1), delivery(2)]
    await c.claim(batch)
    ids = [d.envelope.id for d in batch]
    assert c.store.committed == [False]
    assert sorted(c.runner.aborted) == sorted(ids)
    assert c.acker.acked == [] and c.recorder.written == []
    assert all(d.redelivered for d in batch)
    assert [d.envelope.id for d in c.buffers.take(10)] == ids  # back in the buffer, unacked
    # The slots of the attempts begun are freed by those attempts, the rest at once.
    assert c.claimer._reserved == 2
    c.claimer._reserved = 0
    await c.claim(batch)
    assert c.store.plain_claims == 1 and c.begun_after == ids


async def test_a_nodes_inline_success_hands_the_children_it_releases_to_this_worker() -> None:
    node, plain = delivery(1), delivery(2)
    c = Claiming()
    c.runner.nodes.add(node.envelope.id)
    await c.claim([node, plain])
    assert c.store.committed == [True]
    # The fake releases one child per success, claimed in the claim's transaction and
    # begun once it has committed; the claimer's room for it was lent and taken.
    assert len(c.begun_after) == 2
    assert c.claimer._reserved == 2 + 2


async def test_a_rolled_back_inline_claim_hands_over_nothing_and_frees_the_room_lent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claims, "STORE_RETRY_SECONDS", 0.0)
    c = Claiming(store=Store(complete_error=StoreError("connection lost")))
    batch = [delivery(1), delivery(2)]
    c.runner.nodes.update(d.envelope.id for d in batch)
    await c.claim(batch)
    assert c.store.committed == [False] and c.begun_after == []
    assert c.claimer._reserved == 2  # only the attempts' own, as without nodes
