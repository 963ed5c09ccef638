"""A paused queue's deliveries at the claimer: buffered ones go back to the broker
unclaimed (nacked with requeue), the other queues' stay; a failed claim's deliveries
of a queue paused meanwhile go back too, not into the buffer; a resume lets the
queue's new deliveries be claimed again."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

from taskq.amqp.envelope import Envelope
from taskq.errors import StoreError
from taskq.model import ClaimDecision
from taskq.worker import claims
from taskq.worker.consumer import Buffers, Delivery
from tests.support.claiming import DELAYS, Channel, Claiming, Store


def delivery(tag: int, queue: str) -> Delivery:
    return Delivery(Envelope(uuid.uuid4(), "t", 1), queue, cast(Any, Channel()), tag)


def claiming(store: Store | None = None) -> Claiming:
    return Claiming(store or Store(), buffers=Buffers(["default", "low"]))


async def settled(c: Claiming) -> None:
    if c.claimer._background:
        await asyncio.wait(list(c.claimer._background), timeout=5.0)


def test_buffers_remove_one_queue() -> None:
    buffers = Buffers(["default", "low"])
    low = [delivery(1, "low"), delivery(3, "low")]
    other = delivery(2, "default")
    for d in (low[0], other, low[1]):
        buffers.put(d)
    assert buffers.remove("low") == low
    assert len(buffers) == 1
    assert buffers.take(10) == [other]
    assert buffers.remove("low") == []


async def test_a_pause_gives_the_buffered_deliveries_of_its_queue_back() -> None:
    c = claiming()
    low = [delivery(1, "low"), delivery(2, "low")]
    other = delivery(3, "default")
    for d in (*low, other):
        c.buffers.put(d)
    assert c.claimer.pause("low") == 2
    await settled(c)
    assert c.acker.given_back == [1, 2] and c.acker.rejected == []
    assert c.buffers.take(10) == [other]
    c.claimer.resume("low")
    again = delivery(4, "low")
    c.claimer.put(again)
    assert c.buffers.take(10) == [again]


async def claim_while_pausing(c: Claiming, batch: list[Delivery], queue: str) -> None:
    """Claim ``batch`` as run() does, pausing ``queue`` while the claim runs."""
    c.claimer._reserved += len(batch)
    c.claimer._claims += 1
    claim = asyncio.create_task(c.claimer._claim(batch))
    c.claimer.pause(queue)
    await claim
    await settled(c)


async def test_a_failed_claim_gives_back_the_deliveries_of_a_queue_paused_meanwhile(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(claims, "STORE_RETRY_SECONDS", 0.0)
    c = claiming(Store(error=StoreError("down")))
    low, other = delivery(1, "low"), delivery(2, "default")
    await claim_while_pausing(c, [low, other], "low")
    assert c.acker.given_back == [1]
    assert c.buffers.take(10) == [other]
    assert c.claimer._reserved == 0 and c.count(ClaimDecision.CLAIMED) == 0


def come_due(c: Claiming) -> None:
    """Bring every delivery the claimer holds due now, as its timer would."""
    for delivery, handle in list(c.claimer._held.values()):
        handle.cancel()
        c.claimer._come_due(delivery)
    assert c.claimer.held == 0


async def test_a_pause_gives_back_the_held_deliveries_of_its_queue() -> None:
    # Early or limited deliveries due within the hold wait unacked in the claimer; a
    # pause gives its queue's back at once, so none is claimed when it comes due.
    low, other = delivery(1, "low"), delivery(2, "default")
    for d in (low, other):
        DELAYS[d.envelope.id] = 1.0
    c = claiming(Store({low.envelope.id: ClaimDecision.LIMITED,
                        other.envelope.id: ClaimDecision.EARLY}))  # fmt: skip
    await c.claim([low, other])
    assert c.claimer.held == 2 and c.acker.given_back == []
    timers = {d.queue: handle for d, handle in c.claimer._held.values()}
    assert c.claimer.pause("low") == 1
    assert timers["low"].cancelled() and not timers["default"].cancelled()
    assert c.claimer.held == 1
    assert c.claimer.metrics.registry.get_sample_value("taskq_deliveries_held") == 1
    await settled(c)
    assert c.acker.given_back == [1]
    come_due(c)
    # Only the other queue's came due: back in the buffer to be claimed.
    assert c.buffers.take(10) == [other]
    assert c.acker.acked == [] and c.acker.rejected == [] and c.publisher.sent == []


async def test_a_claim_in_flight_gives_back_what_it_would_hold_of_a_paused_queue() -> None:
    low, other = delivery(1, "low"), delivery(2, "default")
    for d in (low, other):
        DELAYS[d.envelope.id] = 1.0
    store = Store({low.envelope.id: ClaimDecision.LIMITED,
                   other.envelope.id: ClaimDecision.LIMITED})  # fmt: skip
    c = claiming(store)
    await claim_while_pausing(c, [low, other], "low")
    assert c.acker.given_back == [1]
    assert c.claimer.held == 1  # the other queue's: held until it is due
    come_due(c)
    assert c.buffers.take(10) == [other] and c.claimer._reserved == 0
