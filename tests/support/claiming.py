"""Fakes of a claimer's parts, and a claimer wired to them (tests/unit/test_claims.py,
tests/unit/test_queue_pauses.py, tests/unit/test_inline.py).

:class:`Claiming` wires a :class:`~taskq.worker.claims.Claimer` of worker ``w1`` to a
:class:`Store` answering each id with the decision a test asks for, a
:class:`Publisher` and an :class:`Acker` that record what they are asked to do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from taskq.amqp.broker import Publish
from taskq.amqp.envelope import Envelope
from taskq.errors import PublishError
from taskq.metrics import WorkerMetrics
from taskq.model import ClaimDecision, ClaimedTask, Unclaimed
from taskq.worker.claims import Claimer
from taskq.worker.consumer import Buffers, Delivery
from taskq.worker.inline import Inline


def fake_claimer(
    store: object,
    publisher: object,
    buffers: Buffers,
    acker: object,
    begin: Callable[[ClaimedTask], object],
    inline: Inline | None = None,
) -> Claimer:
    """A claimer of worker ``w1`` (lease 30 s, 10 slots) on fakes of its parts."""
    return Claimer(
        cast(Any, store),
        cast(Any, publisher),
        buffers,
        cast(Any, acker),
        begin=begin,
        metrics=WorkerMetrics(),
        worker_id="w1",
        lease=30.0,
        concurrency=10,
        inline=inline,
    )


QUEUE = "default"


@dataclass
class Channel:
    """What a delivery needs of its channel: whether it closed."""

    is_closed: bool = False


# The delay of an early or limited row, by task id (default 42.5 s).
DELAYS: dict[uuid.UUID, float] = {}


@dataclass
class Store:
    """Answers the claim with one row per id, each with the decision asked for."""

    decisions: dict[uuid.UUID, ClaimDecision] = field(default_factory=dict)
    error: Exception | None = None
    claimed: list[tuple[list[uuid.UUID], str, float]] = field(default_factory=list)
    marked: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    republished: list[uuid.UUID] = field(default_factory=list)

    async def claim(
        self, ids: list[uuid.UUID], worker_id: str, lease: float
    ) -> list[ClaimedTask | Unclaimed]:
        self.claimed.append((list(ids), worker_id, lease))
        if self.error is not None:
            raise self.error
        return [row(i, decision) for i, decision in self.decisions.items() if i in ids]

    async def mark_published(self, items: list[tuple[uuid.UUID, int]]) -> None:
        self.marked.extend(items)

    async def republish(self, ids: list[uuid.UUID]) -> None:
        self.republished.extend(ids)


def row(task_id: uuid.UUID, decision: ClaimDecision) -> ClaimedTask | Unclaimed:
    """The claim's record for one id, as the store answers it."""
    if decision is ClaimDecision.CLAIMED:
        now = datetime.now(UTC)
        return ClaimedTask(task_id, "t", QUEUE, "{}", 3, 3, 10.0, now, now, uuid.uuid4())
    if decision is ClaimDecision.MISSING:
        return Unclaimed(task_id, decision)
    if decision in (ClaimDecision.EARLY, ClaimDecision.LIMITED):
        return Unclaimed(task_id, decision, "t", QUEUE, 3, delay=DELAYS.get(task_id, 42.5))
    if decision is ClaimDecision.EXHAUSTED:
        return Unclaimed(task_id, decision, "t", QUEUE, 3, "ValueError: boom", 2)
    return Unclaimed(task_id, decision, "t", QUEUE, 3)


@dataclass
class Publisher:
    """Records what is published; ``error`` makes every publish fail."""

    error: PublishError | None = None
    sent: list[tuple[str, uuid.UUID, str, dict[str, Any]]] = field(default_factory=list)

    async def publish(
        self,
        envelope: Envelope,
        queue: str,
        *,
        delay: float = 0.0,
        headers: dict[str, Any] | None = None,
    ) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(("publish", envelope.id, queue, {"delay": delay, **(headers or {})}))

    async def publish_many(self, items: list[Publish]) -> list[PublishError | None]:
        for item in items:
            if item.dead_letter:
                self.sent.append(("dead_letter", item.envelope.id, item.queue, item.headers or {}))
            else:
                sent = {"delay": item.delay, **(item.headers or {})}
                self.sent.append(("publish", item.envelope.id, item.queue, sent))
        return [self.error] * len(items)

    async def publish_dead_letter(
        self, envelope: Envelope, queue: str, headers: dict[str, Any]
    ) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(("dead_letter", envelope.id, queue, headers))


@dataclass
class Acker:
    """Records the deliveries acked and rejected."""

    acked: list[uuid.UUID] = field(default_factory=list)
    rejected: list[tuple[int, bool]] = field(default_factory=list)
    given_back: list[int] = field(default_factory=list)

    async def ack(self, deliveries: list[Delivery]) -> None:
        self.acked.extend(d.envelope.id for d in deliveries)

    async def reject(self, channel: Channel, tag: int, *, requeue: bool) -> None:
        self.rejected.append((tag, requeue))

    async def give_back(self, channel: Channel, tag: int) -> None:
        self.given_back.append(tag)


@dataclass
class Claiming:
    """A claimer wired to the fakes, and what it started running."""

    store: Store
    publisher: Publisher = field(default_factory=Publisher)
    acker: Acker = field(default_factory=Acker)
    buffers: Buffers = field(default_factory=lambda: Buffers([QUEUE]))
    begun: list[uuid.UUID] = field(default_factory=list)
    claimer: Claimer = field(init=False)

    def __post_init__(self) -> None:
        self.claimer = fake_claimer(
            self.store, self.publisher, self.buffers, self.acker, lambda r: self.begun.append(r.id)
        )

    async def claim(self, deliveries: list[Delivery]) -> None:
        self.claimer._reserved += len(deliveries)  # as run() does before a claim
        self.claimer._claims += 1
        await self.claimer._claim(deliveries)
        if self.claimer._background:  # the early, exhausted and missing being settled
            await asyncio.wait(list(self.claimer._background), timeout=5.0)

    def count(self, decision: ClaimDecision) -> float:
        """``taskq_deliveries_total`` of this decision."""
        labels = {"queue": QUEUE, "decision": decision}
        value = self.claimer.metrics.registry.get_sample_value("taskq_deliveries_total", labels)
        return value or 0.0
