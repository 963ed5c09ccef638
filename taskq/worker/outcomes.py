"""Recording attempts' outcomes: one statement per kind for everything that finished meanwhile.

Every statement is guarded by the claim's token: an outcome of a claim that was
taken over (its lease expired and the sweeper, another worker or an operator's
retry moved the task on) changes nothing and is counted as ``stale``. A cancel an
operator requested while the attempt ran wins over its outcome: the task is
recorded CANCELLED (counted as ``cancelled``), and nothing is published. Retries and
terminal failures are published after their commit, through the outbox; a
publish that fails stays owed in Postgres and the relay pays it later.

An outcome waiting to be recorded keeps its lease: the worker's heartbeat goes on
extending it until the outcome is recorded, found stale, refused or given up.
That is what a retry after a failed statement relies on: while the database is
briefly away the claim stays this worker's, so the outcome is recorded when it
is back instead of the task running again. The database refusing the data
(:class:`~taskq.errors.RejectedByDatabase`) is not retried: a refused result
fails the task, saying why. Any other error is retried every second for
:data:`GIVE_UP_SECONDS` at most; then the outcome is dropped (logged), its lease
runs out and the sweeper takes the task back, so nothing keeps a lease for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from taskq.errors import RejectedByDatabase, StoreError
from taskq.fleet.relay import Outbox
from taskq.metrics import WorkerMetrics
from taskq.model import DeadLetterReason, Handoff, OutcomeKind, OwedPublish, TaskStatus
from taskq.service import Service
from taskq.store import Store

log = logging.getLogger("taskq.worker")

RETRY_SECONDS = 1.0
GIVE_UP_SECONDS = 300.0
# At most this many children released by successes of workflow nodes are claimed
# for the worker that recorded them (a chain's next step at once); a wider fan-out's
# other children are published for the whole fleet.
NODE_HANDOFF = 16


@dataclass(slots=True)
class Finished:
    """One attempt's outcome, waiting to be recorded.

    ``token`` names the claim; ``result`` is the JSON text of a success;
    ``error`` the reason of a retry or failure; ``delay`` the seconds until a
    retry is due; ``failing_since`` when recording it first failed;
    ``holds_slot`` whether the attempt holds a concurrency slot (given back with it);
    ``keeps_place`` whether its worker place is still taken, for the task that slot
    releases (the recorder hands it over or frees it, once); ``node`` whether it is a
    workflow node's (its success may release its children, which the recorder may
    hand over to this worker as well).
    """

    kind: OutcomeKind
    id: uuid.UUID
    token: uuid.UUID
    attempt: int
    type: str
    queue: str
    result: str | None = None
    error: str | None = None
    delay: float = 0.0
    failing_since: float | None = None
    holds_slot: bool = False
    keeps_place: bool = False
    node: bool = False


class Recorder(Service):
    """Collects outcomes and records them in batches, one statement per kind at a time.

    While a batch is being written the next one collects, so under load the
    batches grow by themselves and no outcome waits for a timer.

    Args:
        store: the database.
        outbox: publishes retries and dead letters after their commit.
        metrics: the worker's metrics.
        on_recorded: called with the claim token of each attempt closed (its outcome
            recorded, found stale or given up), so its lease is no longer extended.
        handoffs: the claimer, which lends room for the tasks that the concurrency
            slots of outcomes release (claimed for this worker in the outcome's
            transaction, see :class:`~taskq.model.Handoff`) and starts them; None:
            released tasks are published for any worker.
    """

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        metrics: WorkerMetrics,
        on_recorded: Callable[[uuid.UUID], None],
        handoffs: Handoffs | None = None,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._metrics = metrics
        self._on_recorded = on_recorded
        self.handoffs = handoffs
        self._pending: list[Finished] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    name = "taskq-recorder"
    stop_timeout = 15.0

    async def _start(self) -> None:
        self._spawn(self._run(), self.name)

    def add(self, finished: Finished) -> None:
        self._pending.append(finished)
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            kinds: dict[OutcomeKind, list[Finished]] = {}
            for item in batch:
                kinds.setdefault(item.kind, []).append(item)
            await asyncio.gather(*(self._record(kind, items) for kind, items in kinds.items()))
            if not self._pending:
                self._idle.set()

    async def _record(self, kind: OutcomeKind, items: list[Finished]) -> None:
        self._metrics.batch_size.labels(kind).observe(len(items))
        try:
            recorded = await self._write(kind, items)
        except StoreError as exc:
            if len(items) > 1:
                # One bad row must not hold back the others: record them one by one.
                for item in items:
                    await self._record(kind, [item])
                return
            [item] = items
            if isinstance(exc, RejectedByDatabase):
                self._rejected(kind, item, exc)
                return
            now = time.monotonic()
            item.failing_since = item.failing_since or now
            if now - item.failing_since > GIVE_UP_SECONDS:
                log.error(
                    "task %s: giving up recording its %s after %gs of failures (%s); its lease"
                    " runs out and the sweeper takes the task back",
                    item.id, kind.label, GIVE_UP_SECONDS, exc, extra=_fields(item),
                )  # fmt: skip
                self._on_recorded(item.token)
                return
            # Keep it and try again: the lease still holds (the heartbeat goes
            # on), and if it expires first the guarded statement is a no-op.
            log.warning("recording an outcome of task %s failed, retrying: %s", item.id, exc)
            await asyncio.sleep(RETRY_SECONDS)
            self._pending.append(item)
            self._wake.set()
            return
        except Exception:
            # A bug must not stop the recorder; the leases expire and the
            # sweeper puts these tasks back.
            log.exception("recording %d outcomes failed; dropping them", len(items))
            for item in items:
                self._on_recorded(item.token)
            return
        self.close_attempts(kind, items, recorded)

    def close_attempts(
        self,
        kind: OutcomeKind,
        items: Sequence[Finished],
        recorded: Mapping[uuid.UUID, TaskStatus | OwedPublish],
    ) -> None:
        """Outcomes written (by this recorder, or inline in their claim's transaction,
        :mod:`taskq.worker.inline`), ``recorded`` as the statement answered: close
        their claims, count them, publish what they owe."""
        processed: Counter[tuple[str, str, str]] = Counter()
        for item in items:
            self._on_recorded(item.token)
            found = recorded.get(item.id)
            if found is None:
                processed[item.type, item.queue, "stale"] += 1
                log.warning(
                    "task %s attempt %d: the claim was taken over; this %s was not recorded",
                    item.id,
                    item.attempt,
                    kind.label,
                    extra=_fields(item),
                )
                continue
            owed = found if isinstance(found, OwedPublish) else None
            status = found if owed is None else owed.status
            if status == TaskStatus.CANCELLED:
                processed[item.type, item.queue, "cancelled"] += 1
                continue
            processed[item.type, item.queue, kind.label] += 1
            if kind is OutcomeKind.RETRY:
                self._metrics.retries.labels(item.type, item.queue).inc()
            elif kind is OutcomeKind.FAIL:
                self._metrics.dead_lettered.labels(item.queue, DeadLetterReason.FAILED).inc()
            if owed is not None:  # a retry, a failure or a task given back
                self._publish(owed)
        for (task_type, queue, outcome), count in processed.items():
            self._metrics.processed.labels(task_type, queue, outcome).inc(count)

    def _rejected(self, kind: OutcomeKind, item: Finished, exc: RejectedByDatabase) -> None:
        """An outcome the database refuses: trying again would fail the same way."""
        if kind is OutcomeKind.COMPLETE:
            # The handler ran, but its result cannot be kept: fail the task, saying why.
            error = f"RejectedByDatabase: the result was refused: {exc}"[:2000]
            log.error("task %s: %s", item.id, error, extra=_fields(item))
            self.add(Finished(OutcomeKind.FAIL, item.id, item.token, item.attempt, item.type,
                              item.queue, error=error, holds_slot=item.holds_slot))  # fmt: skip
            return
        # The worker cleans errors before they get here, so this is a bug; the
        # lease expires and the sweeper puts the task back.
        log.error("task %s: the database refused its %s: %s", item.id, kind, exc)
        self._on_recorded(item.token)

    async def _write(
        self, kind: OutcomeKind, items: Sequence[Finished]
    ) -> Mapping[uuid.UUID, TaskStatus | OwedPublish]:
        """Run the statement; by id, the tasks recorded: a success's new status, or what
        the others owe (with their new status).

        An id missing from the answer was stale: its claim had been taken over.
        """
        freeing = sum(i.holds_slot for i in items)
        places = sum(i.keeps_place for i in items)
        # Successes of workflow nodes may release their children: room for some.
        nodes = kind is OutcomeKind.COMPLETE and any(i.node for i in items)
        for item in items:
            item.keeps_place = False  # from here on the places are the claimer's again
        handoffs = self.handoffs
        if handoffs is None or not (freeing or nodes) or kind is OutcomeKind.GIVE_BACK:
            if places and handoffs is not None:
                handoffs.release(places)
            return await self._statement(kind, items, freeing > 0, None)
        handoff = handoffs.lend(freeing + NODE_HANDOFF * nodes, places)
        try:
            return await self._statement(kind, items, freeing > 0, handoff, nodes=nodes)
        finally:
            if handoff is not None:
                handoffs.took(handoff)

    async def _statement(
        self,
        kind: OutcomeKind,
        items: Sequence[Finished],
        slots: bool,
        handoff: Handoff | None,
        *,
        nodes: bool = False,
    ) -> Mapping[uuid.UUID, TaskStatus | OwedPublish]:
        store = self._store
        if kind is OutcomeKind.COMPLETE:
            return await store.complete(
                [(i.id, i.token, i.result or "null") for i in items],
                holds_slots=slots,
                handoff=handoff,
                nodes=nodes,
            )
        if kind is OutcomeKind.CANCEL:
            rows = await store.cancel_running(
                [(i.id, i.token) for i in items], holds_slots=slots, handoff=handoff
            )
        elif kind is OutcomeKind.RETRY:
            rows = await store.retry(
                [(i.id, i.token, i.error or "", i.delay) for i in items],
                holds_slots=slots,
                handoff=handoff,
            )
        elif kind is OutcomeKind.FAIL:
            rows = await store.fail(
                [(i.id, i.token, i.error or "") for i in items], holds_slots=slots, handoff=handoff
            )
        else:
            rows = await store.give_back([(i.id, i.token) for i in items], holds_slots=slots)
        return {row.id: row for row in rows}

    def _publish(self, owed: OwedPublish) -> None:
        if not self._outbox.submit(owed):
            log.warning("outbox full: task %s stays owed for the relay", owed.id)

    async def _stop(self, timeout: float) -> None:
        """Record what is pending (within ``timeout``), then stop; leases cover the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        await self._cancel_tasks()
        if self._pending:
            log.warning("%d outcomes not recorded at shutdown", len(self._pending))


class Handoffs(Protocol):
    """Lends a worker's room to the outcomes that free concurrency slots or release
    workflow nodes (the claimer)."""

    def lend(self, wanted: int, places: int) -> Handoff | None: ...

    def took(self, handoff: Handoff) -> None: ...

    def release(self, slots: int = 1) -> None: ...


def _fields(item: Finished) -> dict[str, object]:
    return {"task_id": str(item.id), "task_type": item.type, "attempt": item.attempt}
