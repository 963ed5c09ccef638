"""Inline attempts: handlers start inside their claim's transaction, quick successes commit with it.

Ordinarily a delivery costs two transactions on its task's row: the claim
commits RUNNING, then the recorder commits the outcome. With an *inline window*
(``TASKQ_WORKER_INLINE_WINDOW``, ``taskq worker --inline-window``; 0 turns it
off) a batch's claim runs in a transaction that stays open for at most the
window. The claimed handlers start as soon as the claim statement answers; the
successes that end within the window are written by the ``complete`` statement
in the same transaction; then it commits (one commit for both) and the
deliveries are acked, the ack following the commit as always. Handlers still
running when the window ends go on as ordinary attempts: their RUNNING row
commits with the claim, and the heartbeat and the recorder take over. Other
outcomes (a retry, a failure, a cancel, a task given back) and successes that
end after the ``complete`` statement are recorded by the recorder once the
claim has committed.

Only handlers that can start at once run inline: a sync handler is begun in the
window only if a thread of the pool is free for it (its place taken then), else
once the claim has committed, as an ordinary attempt. A batch with more sync
handlers than free threads would otherwise keep its transaction open the whole
window for handlers that wait for a thread and end after it all the same; this
way every attempt in a window can end in it, and the window's wait ends as soon
as they all have.

What this bends, for at most the window (docs/workers.md, "Inline attempts"):

- The claim is not committed while its handlers start. If the worker dies, or
  a statement or the commit fails, inside the window, the claim rolls back: the
  attempt never happened (not counted). The deliveries come back unacked, and
  none of them runs inline again: RabbitMQ marks a dead worker's deliveries
  ``redelivered``, the claimer marks those of a failed claim itself, and such
  deliveries are claimed and committed before their handler runs, as without
  the window, so that a handler that kills its worker is counted and cannot
  loop.
- The claimed rows stay locked until the commit: an operator's cancel, or
  another worker claiming a duplicate delivery, waits for it; the sweeper
  skips locked rows; the heartbeat leaves attempts out until their claim has
  committed.
- A pool connection per open claim (at most two at once) stays busy that long.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from taskq.metrics import WorkerMetrics
from taskq.model import ClaimedTask, Handoff, OutcomeKind, TaskStatus, Unclaimed
from taskq.store import Store
from taskq.worker.consumer import Delivery
from taskq.worker.outcomes import NODE_HANDOFF, Finished, Recorder

if TYPE_CHECKING:
    from taskq.worker.execution import Runner

log = logging.getLogger("taskq.worker")

# At most this long (a setting's upper bound): the window holds row locks and a connection.
MAX_WINDOW_SECONDS = 1.0
_COMPLETE = OutcomeKind.COMPLETE


class Window:
    """The attempts begun inside one open claim, and the outcomes they ended with
    while it was open."""

    __slots__ = ("begun", "committed", "open", "outcomes", "tasks")

    def __init__(self) -> None:
        self.begun: set[uuid.UUID] = set()  # task ids whose handler started inline
        self.tasks: list[asyncio.Task[None]] = []
        self.outcomes: list[Finished] = []
        self.open = True  # outcomes are held for the claim
        self.committed = False  # the claim committed: its attempts are ordinary ones now

    def take(self, outcome: Finished) -> bool:
        """Hold ``outcome`` for the claim; False once the window is closed (the caller
        records it as usual)."""
        if self.open:
            self.outcomes.append(outcome)
        return self.open

    def successes(self) -> list[Finished]:
        """Take the successes held so far, to be written in the claim's transaction."""
        done = [f for f in self.outcomes if f.kind is _COMPLETE]
        if done:
            self.outcomes = [f for f in self.outcomes if f.kind is not _COMPLETE]
        return done

    def close(self, *, committed: bool) -> list[Finished]:
        """Hold nothing more; returns the outcomes still held."""
        self.open = False
        self.committed = committed
        self.tasks = []  # attempts that outlive the window keep it: keep it small
        held, self.outcomes = self.outcomes, []
        return held


class Inline:
    """Claims batches with an inline window.

    Args:
        seconds: how long the claim's transaction waits for its handlers.
        runner: starts the attempts (and stops them if the claim rolls back).
        recorder: takes the outcomes not written in the claim's transaction.
        metrics: the worker's metrics.
    """

    def __init__(
        self, seconds: float, runner: Runner, recorder: Recorder, metrics: WorkerMetrics
    ) -> None:
        if not 0 < seconds <= MAX_WINDOW_SECONDS:
            raise ValueError(f"an inline window is more than 0 and at most {MAX_WINDOW_SECONDS}s")
        self.seconds = seconds
        self._runner = runner
        self._recorder = recorder
        self._metrics = metrics

    async def claim(
        self,
        store: Store,
        batch: Sequence[Delivery],
        worker_id: str,
        lease: float,
        window: Window,
    ) -> list[ClaimedTask | Unclaimed]:
        """Claim ``batch`` and run its claimed tasks inline, except the redelivered
        and the sync ones that would wait for a thread (see :meth:`Runner.begin_inline`).

        Returns the claim's records once it has committed; the ids whose attempt
        began are in ``window.begun``. Raises whatever failed (a
        :class:`~taskq.errors.StoreError`, a cancellation) after stopping the
        attempts begun: the claim rolled back.
        """
        again = {d.envelope.id for d in batch if d.redelivered}
        written: list[Finished] = []
        recorded: dict[uuid.UUID, TaskStatus] = {}
        handoffs = self._recorder.handoffs
        handoff: Handoff | None = None
        try:
            async with store.claim_open([d.envelope.id for d in batch], worker_id, lease) as claim:
                for row in claim.rows:
                    if isinstance(row, ClaimedTask) and row.id not in again:
                        # None: a sync handler finds no free thread (begun after the commit).
                        task = self._runner.begin_inline(row, window)
                        if task is not None:
                            window.begun.add(row.id)
                            window.tasks.append(task)
                if window.tasks:
                    await asyncio.wait(window.tasks, timeout=self.seconds)
                    written = window.successes()
                if written:
                    self._metrics.batch_size.labels(_COMPLETE).observe(len(written))
                    nodes = any(f.node for f in written)
                    if nodes and handoffs is not None:
                        # Room for the workflow nodes these successes release.
                        handoff = handoffs.lend(NODE_HANDOFF, 0)
                    recorded = await claim.complete(
                        [(f.id, f.token, f.result or "null") for f in written],
                        holds_slots=any(f.holds_slot for f in written),
                        handoff=handoff,
                        nodes=nodes,
                    )
        except BaseException:
            self._runner.abort(window)
            if handoff is not None and handoffs is not None:
                handoff.claimed = []  # rolled back: never claimed
                handoffs.took(handoff)
            raise
        if handoff is not None and handoffs is not None:
            handoffs.took(handoff)
        # Committed: nothing below may fail the claim (its deliveries must be acked).
        later = window.close(committed=True)
        try:
            if written:
                self._recorder.close_attempts(_COMPLETE, written, recorded)
        except Exception:  # a bug of taskq's; the tasks are SUCCEEDED all the same
            log.exception("counting %d inline successes failed", len(written))
        for outcome in later:
            self._recorder.add(outcome)
        return claim.rows
