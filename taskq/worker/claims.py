"""Claiming: buffered deliveries get free slots, one ``claim`` statement per batch.

When concurrency slots are free, :meth:`Claimer.run` takes buffered envelopes
(chosen by priority weight, see :mod:`taskq.worker.consumer`) and claims all of them
in one statement; while it runs, further envelopes collect for the next one, so
batches grow with the load and nothing waits for a timer. Once the claim
commits the deliveries are acked (``multiple`` where the tags allow): from here
Postgres, not the broker, owns each task. Per decision: *claimed* → run;
*terminal*, *duplicate* → drop; *early* and *limited* (over its type's rate
limit, its run_at moved to its reserved slot) → back through the delay levels
for the whole seconds of the remaining time; *exhausted* (now FAILED) and
*missing* (no such task) → the DLQ with reason headers. Those are acked once
their publish is confirmed.

The delay levels count whole seconds. So that a task starts at its run_at to
the millisecond (a rate limit's slots are 20 ms apart at 50 per second), an
early or limited delivery due within :data:`HOLD_SECONDS` is held here, unacked,
and claimed again when it is due (before the other deliveries, and past the limit
of claims in flight); one due later goes through the delay levels for the whole
seconds of its wait less a margin (so that it comes back early even when RabbitMQ
expires it a little late), and is held for the rest when it comes back. A held
delivery takes a prefetch slot (never a concurrency slot); if the worker stops or
dies, RabbitMQ redelivers it. A rate-limited task is due a little before its slot
(:data:`taskq.ratelimits.CLAIM_AHEAD_SECONDS`): claimed then, its attempt waits for
the slot (``ClaimedTask.start_at``) before its handler runs.

With an inline window (:mod:`taskq.worker.inline`) the claim's transaction stays
open while its claimed handlers start, for the successes within the window to
commit with it; deliveries marked redelivered are begun only after the commit.
A claim that fails after handlers began marks its deliveries redelivered too.

A paused queue's buffered deliveries are given back to the broker unclaimed
(nacked with requeue), and so are its held ones (never claimed when they come
due), those a claim in flight decides to hold after the pause, and those of a
failed claim put back after the pause; a claim already in flight when the pause
comes goes on (see :mod:`taskq.worker.pauses`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from taskq.amqp.broker import Publish, Publisher
from taskq.errors import StoreError, TaskqError
from taskq.fleet.relay import dead_letter_headers, publish_row
from taskq.metrics import WorkerMetrics
from taskq.model import ClaimDecision, ClaimedTask, DeadLetterReason, Handoff, Unclaimed
from taskq.ratelimits import HOLD_SECONDS
from taskq.service import Service
from taskq.store import Store
from taskq.tracing import header
from taskq.worker.consumer import Acker, Buffers, Delivery
from taskq.worker.inline import Inline, Window

log = logging.getLogger("taskq.worker")

CLAIM_BATCH = 200
# Two claims in flight at most. The first starts as soon as anything is
# buffered (low latency when idle); a second only once a quarter of a full
# batch (or of the concurrency, if smaller) is waiting, so that under load
# deliveries collect while a claim runs instead of each arriving envelope
# starting a claim (and an ack) of its own.
CLAIMS_IN_FLIGHT = 2
SECOND_CLAIM_MIN = CLAIM_BATCH // 4
# Held deliveries that came due are claimed at once, in up to this many claims more:
# their start is timed (a rate limit's slot), and they are few.
DUE_CLAIMS = 3
STORE_RETRY_SECONDS = 1.0
# One due later goes through the delay levels for the whole seconds of its wait less
# this, so that it comes back before it is due even when RabbitMQ expires it late.
SEND_BACK_MARGIN = 0.25
_CLAIMED = ClaimDecision.CLAIMED
_DUPLICATE = ClaimDecision.DUPLICATE
# Deliveries acked and dropped: their task is done, or another claim owns it.
# A parked one is WAITING: published again when it is released.
_DROPPED = (ClaimDecision.TERMINAL, ClaimDecision.DUPLICATE, ClaimDecision.PARKED)
# Deliveries of tasks not due yet: held, or sent back through the delay levels.
_WAITING = (ClaimDecision.EARLY, ClaimDecision.LIMITED)


class Claimer(Service):
    """Holds the concurrency slots and turns buffered deliveries into running attempts.

    Args:
        store: the database.
        publisher: for early, exhausted and missing deliveries.
        buffers: the deliveries waiting for a slot.
        acker: settles deliveries.
        begin: starts running a claimed row; its handler must call :meth:`release`
            when done.
        metrics: the worker's metrics.
        worker_id: recorded on the claims.
        lease: seconds a claim holds before the heartbeat extends it.
        concurrency: slots, i.e. attempts running at once.
        inline: claims batches with an inline window (:mod:`taskq.worker.inline`);
            ``None``: each claim commits before its handlers start.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        buffers: Buffers,
        acker: Acker,
        *,
        begin: Callable[[ClaimedTask], object],
        metrics: WorkerMetrics,
        worker_id: str,
        lease: float,
        concurrency: int,
        inline: Inline | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.worker_id = worker_id
        self.lease = lease
        self.concurrency = concurrency
        self._buffers = buffers
        self._acker = acker
        self._begin = begin
        self._inline = inline
        self._reserved = 0  # slots taken by claims in flight and running handlers
        self._claims = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._background: set[asyncio.Task[Any]] = set()
        self._paused: set[str] = set()
        # Early and limited deliveries held until they are due, by id() of the delivery.
        self._held: dict[int, tuple[Delivery, asyncio.TimerHandle]] = {}
        self._due = 0  # held deliveries that came due since the last batch was taken

    @property
    def held(self) -> int:
        """Early and limited deliveries held until they are due."""
        return len(self._held)

    def put(self, delivery: Delivery) -> None:
        """Buffer a delivery until a slot is free (ignored once stopping: it stays unacked)."""
        if not self._stopping:
            self._buffers.put(delivery)
            self._wake.set()

    def pause(self, queue: str) -> int:
        """Claim nothing more of ``queue``: give its buffered and held deliveries back
        to the broker, unclaimed; returns how many."""
        self._paused.add(queue)
        held = [delivery for delivery, _ in self._held.values() if delivery.queue == queue]
        for delivery in held:
            _, handle = self._held.pop(id(delivery))
            handle.cancel()
        if held:
            self.metrics.held.set(len(self._held))
        given = self._buffers.remove(queue) + held
        self._give_back(given)
        return len(given)

    def resume(self, queue: str) -> None:
        self._paused.discard(queue)

    def _give_back(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._in_background(self._acker.give_back(delivery.channel, delivery.tag))

    def release(self, slots: int = 1) -> None:
        """Free ``slots`` (a handler finished)."""
        self._reserved -= slots
        self._wake.set()

    def lend(self, wanted: int, places: int = 0) -> Handoff | None:
        """Room for up to ``wanted`` tasks that outcomes being recorded may release (their
        concurrency slots freed), for :meth:`took` to start what the store claimed and
        free the rest: the ``places`` those attempts kept (see
        :attr:`~taskq.worker.execution.Runner.keep_places`), and free places if there
        are fewer. None while stopping, or with no room or queue (the kept places
        freed then)."""
        room = min(wanted, places + max(0, self.concurrency - self._reserved))
        queues = self._buffers.queues - self._paused
        if self._stopping or room <= 0 or not queues:
            self.release(places)
            return None
        self._reserved += room - places
        return Handoff(self.worker_id, self.lease, queues, room)

    def took(self, handoff: Handoff) -> None:
        """Start the tasks ``handoff`` claimed (RUNNING under this worker already: a
        stop that began meanwhile gives them back with the other running attempts),
        and free the rest of its room."""
        for task in handoff.claimed:
            self.metrics.handoffs.labels(task.queue).inc()
            self._begin(task)
        self.release(handoff.room - len(handoff.claimed))

    name = "taskq-claim"
    stop_timeout = 15.0

    async def _start(self) -> None:
        self._spawn(self._run(), self.name)

    async def _stop(self, timeout: float) -> None:
        """Claim nothing more; wait up to ``timeout`` for the claims in flight (which
        start their handlers), then as long again for the early, exhausted and
        missing deliveries being settled."""
        self._stopping = True
        self._buffers.clear()  # unacked: requeued when the channels close
        for _, handle in self._held.values():
            handle.cancel()
        self._held.clear()
        self._wake.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    async def _run(self) -> None:
        """Claim while slots and deliveries allow, until :meth:`stop`."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            # Deliveries read in the same socket read are dispatched one task
            # each: let them reach the buffer before taking a batch.
            await asyncio.sleep(0)
            while not self._stopping and self._may_claim():
                count = min(self.concurrency - self._reserved, CLAIM_BATCH)
                # Due deliveries (at the front) are claimed alone: a batch with new
                # deliveries of a limited type would wait for their limiter's lock.
                batch = self._buffers.take(min(count, self._due) if self._due else count)
                self._due = 0
                if not batch:
                    break
                self._reserved += len(batch)
                self._claims += 1
                self._in_background(self._claim(batch))
        # Claims in flight finish (and start their handlers) before stop() goes on.
        while self._claims:
            await self._wake.wait()
            self._wake.clear()

    def _may_claim(self) -> bool:
        """Whether to start a claim now: deliveries and slots are there, and it is
        the only claim in flight or a sizeable batch is waiting, or a held delivery
        came due (its start is timed: it takes up to DUE_CLAIMS more claims in flight)."""
        free = self.concurrency - self._reserved
        if not self._buffers or free <= 0:
            return False
        if self._due:
            return self._claims < CLAIMS_IN_FLIGHT + DUE_CLAIMS
        if self._claims >= CLAIMS_IN_FLIGHT:
            return False
        enough = max(1, min(SECOND_CLAIM_MIN, self.concurrency // 4))
        return self._claims == 0 or min(len(self._buffers), free) >= enough

    def _in_background(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _claim(self, batch: list[Delivery]) -> None:
        self.metrics.batch_size.labels("claim").observe(len(batch))
        window = None
        try:
            if self._inline is not None and not all(d.redelivered for d in batch):
                window = Window()
                rows = await self._inline.claim(
                    self.store, batch, self.worker_id, self.lease, window
                )
            else:
                rows = await self.store.claim(
                    [d.envelope.id for d in batch], self.worker_id, self.lease
                )
        except Exception as exc:
            # Whatever went wrong, the deliveries are still unacked: claim them again later.
            begun = 0
            if window is not None:
                # The claim rolled back, but handlers may have run: never inline again.
                # (Those begun free their slots as their attempts stop.)
                begun = len(window.begun)
                for d in batch:
                    d.redelivered = True
            if isinstance(exc, StoreError):
                log.warning("claiming %d tasks failed, retrying: %s", len(batch), exc)
            else:
                log.exception("claiming %d tasks failed, retrying", len(batch))
            await asyncio.sleep(STORE_RETRY_SECONDS)
            if not self._stopping:
                live = [d for d in batch if d.live]
                self._give_back([d for d in live if d.queue in self._paused])
                self._buffers.put_back(d for d in live if d.queue not in self._paused)
            self._claims -= 1
            self.release(len(batch) - begun)
            return
        by_id = {row.id: row for row in rows}
        acks = []
        sends: list[tuple[Delivery, Unclaimed]] = []
        unused = 0
        counts: Counter[tuple[str, ClaimDecision]] = Counter()
        for delivery in batch:
            row = by_id.pop(delivery.envelope.id, None)
            if isinstance(row, ClaimedTask):
                counts[delivery.queue, _CLAIMED] += 1
                acks.append(delivery)
                if window is None or row.id not in window.begun:
                    self._begin(row)
                continue
            # A second delivery of an id in the same batch is a duplicate.
            unclaimed = Unclaimed(delivery.envelope.id, _DUPLICATE) if row is None else row
            decision = unclaimed.decision
            counts[delivery.queue, decision] += 1
            unused += 1
            if decision is ClaimDecision.LIMITED:
                self.metrics.rate_limited.labels(unclaimed.type or "").inc()
            if decision in _DROPPED:
                acks.append(delivery)
            elif decision in _WAITING and unclaimed.delay <= HOLD_SECONDS:
                self._hold(delivery, unclaimed.delay)
            elif decision in _WAITING:
                sends.append((delivery, unclaimed))
            else:
                self._in_background(self._settle_unclaimed(delivery, unclaimed))
        for (queue, decision), count in counts.items():
            self.metrics.deliveries.labels(queue, decision).inc(count)
        if sends:
            self._in_background(self._send_back(sends))
        self._claims -= 1
        self.release(unused)
        await self._acker.ack(acks)

    async def _settle_unclaimed(self, delivery: Delivery, row: Unclaimed) -> None:
        """Exhausted and missing deliveries: publish where they belong, then ack."""
        envelope = delivery.envelope
        decision = row.decision
        try:
            if decision is ClaimDecision.EXHAUSTED:
                owed = row.dead_letter()
                if await publish_row(self.publisher, owed):
                    await self.store.mark_published([(owed.id, owed.generation)])
                self.metrics.dead_lettered.labels(owed.queue, DeadLetterReason.EXHAUSTED).inc()
            else:  # missing
                headers = dead_letter_headers(
                    f"NoTask: no task with id {envelope.id}", envelope.attempt, delivery.queue
                )
                await self.publisher.publish_dead_letter(envelope, delivery.queue, headers)
                self.metrics.dead_lettered.labels(delivery.queue, DeadLetterReason.MISSING).inc()
                log.warning("envelope for unknown task %s dead-lettered", envelope.id)
        except Exception as exc:
            # Whatever failed (the broker, or a hostile envelope that no message
            # can carry), the delivery must be settled, or it holds a prefetch
            # slot for good.
            if isinstance(exc, TaskqError):
                log.warning("settling a %s delivery of %s failed: %s", decision, envelope.id, exc)
            else:
                log.exception("settling a %s delivery of %s failed", decision, envelope.id)
            # The broker gets it back: a missing task's envelope dead-letters
            # through the queue's DLX; the others are redelivered and decided again.
            requeue = decision is not ClaimDecision.MISSING
            await self._acker.reject(delivery.channel, delivery.tag, requeue=requeue)
            return
        await self._acker.ack([delivery])

    def _hold(self, delivery: Delivery, delay: float) -> None:
        """Keep ``delivery`` (unacked) and buffer it again in ``delay`` seconds; give it
        back at once if its queue was paused while its claim ran."""
        if self._stopping:
            return
        if delivery.queue in self._paused:
            self._give_back([delivery])
            return
        loop = asyncio.get_running_loop()
        handle = loop.call_at(loop.time() + delay, self._come_due, delivery)
        self._held[id(delivery)] = (delivery, handle)
        self.metrics.held.set(len(self._held))

    def _come_due(self, delivery: Delivery) -> None:
        """A held delivery is due: claim it first."""
        self._held.pop(id(delivery), None)
        self.metrics.held.set(len(self._held))
        if delivery.live and not self._stopping:  # else the broker has it back already
            self._buffers.put_back([delivery])
            self._due += 1
            self._wake.set()

    async def _send_back(self, sends: list[tuple[Delivery, Unclaimed]]) -> None:
        """Publish early and limited tasks into the delay levels for the whole seconds of
        their wait less the margin (the rest they are held for when they come back), all
        of a claim's in one write, then ack them. A task the broker refuses is owed in
        Postgres instead: the relay publishes it with the right delay."""
        items = []
        for delivery, row in sends:
            assert row.queue is not None
            seconds = max(1, math.floor(row.delay - SEND_BACK_MARGIN))
            items.append(
                Publish(delivery.envelope, row.queue, float(seconds), header(row.traceparent))
            )
        try:
            errors = await self.publisher.publish_many(items)
            refused = [row.id for (_, row), error in zip(sends, errors, strict=True) if error]
            if refused:
                log.warning("sending %d early tasks back failed, owed: %s", len(refused), errors[0])
                await self.store.republish(refused)
        except Exception as exc:
            # Unacked, they go back to the broker and are decided again.
            if isinstance(exc, TaskqError):
                log.warning("sending %d early tasks back failed: %s", len(sends), exc)
            else:
                log.exception("sending %d early tasks back failed", len(sends))
            for delivery, _ in sends:
                await self._acker.reject(delivery.channel, delivery.tag, requeue=True)
            return
        await self._acker.ack([delivery for delivery, _ in sends])
