"""Claim decisions, through small fakes of the store, the publisher and the acker.

One claim statement decides each delivery of a batch (see the ``claim`` SQL);
:meth:`Claimer._claim` then acts on each decision: *claimed* runs and acks,
*terminal* and *duplicate* ack, *early* goes back through the delay levels,
*exhausted* and *missing* go to the DLQ; those three are acked once published.
A claim the store cannot run puts the batch back, unacked.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import pytest

from taskq.amqp.envelope import Envelope
from taskq.errors import PublishError, StoreError
from taskq.fleet.relay import HEADER_ORIGIN, HEADER_REASON
from taskq.model import ClaimDecision, ClaimedTask
from taskq.worker import claims
from taskq.worker.consumer import Delivery
from tests.support.claiming import DELAYS, QUEUE, Channel, Claiming, Publisher, Store, row


def delivery(tag: int, task_id: uuid.UUID | None = None) -> Delivery:
    envelope = Envelope(task_id or uuid.uuid4(), "t", 1)
    return Delivery(envelope, QUEUE, cast(Any, Channel()), tag)


async def claim_one(
    decision: ClaimDecision, publisher: Publisher | None = None
) -> tuple[Claiming, Delivery]:
    """Claim one delivery whose row gets ``decision``."""
    d = delivery(1)
    c = Claiming(Store({d.envelope.id: decision}), publisher or Publisher())
    await c.claim([d])
    return c, d


async def test_a_claimed_delivery_runs_and_is_acked() -> None:
    c, d = await claim_one(ClaimDecision.CLAIMED)
    assert c.begun == [d.envelope.id]
    assert c.acker.acked == [d.envelope.id]
    assert c.store.claimed == [([d.envelope.id], "w1", 30.0)]
    assert c.publisher.sent == []
    assert c.claimer._reserved == 1  # its slot stays taken until the handler is done
    assert c.count(ClaimDecision.CLAIMED) == 1


@pytest.mark.parametrize("decision", [ClaimDecision.TERMINAL, ClaimDecision.DUPLICATE])
async def test_terminal_and_duplicate_deliveries_are_dropped(decision: ClaimDecision) -> None:
    c, d = await claim_one(decision)
    assert c.acker.acked == [d.envelope.id]
    assert c.begun == [] and c.publisher.sent == []
    assert c.claimer._reserved == 0
    assert c.count(decision) == 1


async def test_a_second_delivery_of_an_id_in_the_same_batch_is_a_duplicate() -> None:
    task_id = uuid.uuid4()
    first, second = delivery(1, task_id), delivery(2, task_id)
    c = Claiming(Store({task_id: ClaimDecision.CLAIMED}))
    await c.claim([first, second])
    assert c.begun == [task_id]  # run once
    assert c.acker.acked == [task_id, task_id]
    assert (c.count(ClaimDecision.CLAIMED), c.count(ClaimDecision.DUPLICATE)) == (1, 1)


@pytest.mark.parametrize("decision", [ClaimDecision.EARLY, ClaimDecision.LIMITED])
async def test_an_early_delivery_goes_back_for_the_whole_seconds_left_then_is_acked(
    decision: ClaimDecision,
) -> None:
    c, d = await claim_one(decision)
    # 42.5 s left: 42 s in the delay levels (42.5 less the margin, rounded down); the
    # rest it is held for when it comes back.
    assert c.publisher.sent == [("publish", d.envelope.id, QUEUE, {"delay": 42.0})]
    assert c.acker.acked == [d.envelope.id]
    assert c.begun == [] and c.store.republished == []
    assert c.count(decision) == 1


@pytest.mark.parametrize("decision", [ClaimDecision.EARLY, ClaimDecision.LIMITED])
async def test_a_delivery_due_within_the_hold_waits_unacked_then_goes_first(
    decision: ClaimDecision,
) -> None:
    d = delivery(1)
    DELAYS[d.envelope.id] = 0.05
    c = Claiming(Store({d.envelope.id: decision}))
    c.buffers.put(delivery(2))
    await c.claim([d])
    assert c.publisher.sent == [] and c.acker.acked == []
    assert c.claimer.held == 1 and c.claimer._reserved == 0  # no concurrency slot taken
    await asyncio.sleep(0.2)
    assert c.claimer.held == 0
    # Back in the buffer, ahead of what waited there, and a claim may start for it.
    assert [x.tag for x in c.buffers.take(2)] == [1, 2]


async def test_held_deliveries_stay_unacked_when_the_claimer_stops() -> None:
    d = delivery(1)
    DELAYS[d.envelope.id] = 0.05
    c = Claiming(Store({d.envelope.id: ClaimDecision.LIMITED}))
    await c.claim([d])
    await c.claimer._stop(1.0)  # what stop() runs once started
    await asyncio.sleep(0.1)
    assert c.claimer.held == 0 and not c.buffers  # the broker redelivers it
    assert c.acker.acked == [] and c.publisher.sent == []


async def test_an_early_delivery_the_broker_refuses_is_owed_in_postgres() -> None:
    c, d = await claim_one(ClaimDecision.EARLY, Publisher(PublishError("nacked")))
    assert c.store.republished == [d.envelope.id]  # the relay publishes it with its delay
    assert c.acker.acked == [d.envelope.id]


async def test_an_exhausted_delivery_is_dead_lettered_with_its_error_then_acked() -> None:
    c, d = await claim_one(ClaimDecision.EXHAUSTED)
    [(kind, task_id, queue, headers)] = c.publisher.sent
    assert (kind, task_id, queue) == ("dead_letter", d.envelope.id, QUEUE)
    assert headers[HEADER_REASON] == "ValueError: boom"
    assert c.store.marked == [(d.envelope.id, 2)]  # the DLQ publish is paid
    assert c.acker.acked == [d.envelope.id]
    assert c.begun == []


async def test_an_exhausted_delivery_whose_publish_fails_stays_owed() -> None:
    c, d = await claim_one(ClaimDecision.EXHAUSTED, Publisher(PublishError("nacked")))
    assert c.store.marked == []  # still owed: the relay publishes it
    assert c.acker.acked == [d.envelope.id]


async def test_a_delivery_of_a_missing_task_goes_to_the_dlq_then_is_acked() -> None:
    c, d = await claim_one(ClaimDecision.MISSING)
    [(kind, task_id, queue, headers)] = c.publisher.sent
    assert (kind, task_id, queue) == ("dead_letter", d.envelope.id, QUEUE)
    assert headers[HEADER_REASON].startswith("NoTask: no task with id")
    assert headers[HEADER_ORIGIN] == QUEUE
    assert c.acker.acked == [d.envelope.id]


@pytest.mark.parametrize(
    ("decision", "requeue"), [(ClaimDecision.MISSING, False), (ClaimDecision.EARLY, True)]
)
async def test_a_delivery_that_cannot_be_sent_on_goes_back_to_the_broker(
    decision: ClaimDecision, requeue: bool
) -> None:
    """Missing: rejected to the queue's DLX. Early: requeued and decided again (the
    store cannot take the debt either here)."""
    d = delivery(7)
    store = Store({d.envelope.id: decision})

    async def unavailable(ids: list[uuid.UUID]) -> None:
        raise StoreError("database error: connection refused")

    store.republish = unavailable  # type: ignore[method-assign]
    c = Claiming(store, Publisher(PublishError("nacked")))
    await c.claim([d])
    assert c.acker.rejected == [(7, requeue)]
    assert c.acker.acked == []


async def test_a_batch_with_every_decision_acts_on_each() -> None:
    decisions = [
        ClaimDecision.CLAIMED, ClaimDecision.TERMINAL, ClaimDecision.DUPLICATE,
        ClaimDecision.EARLY, ClaimDecision.EXHAUSTED, ClaimDecision.MISSING,
    ]  # fmt: skip
    batch = [delivery(tag) for tag in range(1, len(decisions) + 1)]
    by_id = {d.envelope.id: decision for d, decision in zip(batch, decisions, strict=True)}
    c = Claiming(Store(by_id))
    await c.claim(batch)
    assert c.begun == [batch[0].envelope.id]
    assert sorted(c.acker.acked) == sorted(by_id)  # every delivery settled once
    assert sorted(task_id for _, task_id, _, _ in c.publisher.sent) == sorted(
        d.envelope.id for d in batch[3:]
    )
    assert c.claimer._reserved == 1  # only the claimed one holds a slot


async def test_a_claim_the_store_cannot_run_puts_the_batch_back_unacked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claims, "STORE_RETRY_SECONDS", 0.0)
    live, closed = delivery(1), delivery(2)
    closed.channel = cast(Any, Channel(is_closed=True))  # the broker requeued it already
    c = Claiming(Store(error=StoreError("database error: connection refused")))
    await c.claim([live, closed])
    assert c.acker.acked == [] and c.acker.rejected == []
    assert c.begun == [] and c.publisher.sent == []
    assert c.buffers.take(10) == [live]  # claimed again later; the closed one is gone
    assert c.claimer._reserved == 0 and c.claimer._claims == 0


async def test_a_claim_failing_for_any_reason_puts_the_batch_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claims, "STORE_RETRY_SECONDS", 0.0)
    d = delivery(1)
    c = Claiming(Store(error=RuntimeError("a bug")))
    await c.claim([d])
    assert c.buffers.take(10) == [d]
    assert c.acker.acked == []


async def test_room_lent_to_a_handoff_is_the_kept_places_then_free_ones_and_comes_back() -> None:
    # 10 places: 7 taken by running attempts, 2 kept by attempts whose outcomes are
    # being recorded, 1 free.
    c = Claiming(Store({}))
    claimer = c.claimer
    claimer._reserved = 9
    handoff = claimer.lend(4, places=2)
    assert handoff is not None
    assert (handoff.room, handoff.queues, handoff.worker_id) == (3, frozenset({QUEUE}), "w1")
    assert claimer._reserved == 10
    handoff.claimed = [cast(ClaimedTask, row(uuid.uuid4(), ClaimDecision.CLAIMED))]
    claimer.took(handoff)
    # The task claimed runs in one place; the two others are free again.
    assert c.begun == [handoff.claimed[0].id] and claimer._reserved == 8
    sample = claimer.metrics.registry.get_sample_value
    assert sample("taskq_handoffs_total", {"queue": QUEUE}) == 1
    # With no room, the kept places are freed at once.
    claimer._reserved = 10
    assert claimer.lend(3, places=0) is None and claimer._reserved == 10
    # A paused queue takes no handoff, nor a stopping worker: their places are freed.
    claimer.pause(QUEUE)
    assert claimer.lend(2, places=1) is None and claimer._reserved == 9
    claimer.resume(QUEUE)
    await claimer.start()
    await claimer.stop()
    assert claimer.lend(2, places=1) is None and claimer._reserved == 8
