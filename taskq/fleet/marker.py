"""Published markers: confirmed publishes recorded in batches, a second after the confirm."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import uuid

from taskq.errors import StoreError
from taskq.service import Service
from taskq.store import Store

log = logging.getLogger("taskq.relay")

# How old a confirmed publish is before its marker is written (see Marker): an
# outbox's row is marked within OUTBOX_MAX_WAIT + MARK_DELAY, well inside the
# relay's minimum age (taskq.fleet.relay.RELAY_MIN_AGE).
MARK_DELAY = 1.0


class Marker(Service):
    """Collects confirmed publishes and records them in batched statements; also
    tells the relay, in batches, of the rows an outbox left to it.

    A publish is recorded once it is ``delay`` seconds old. By then a worker has
    usually claimed the task, and the claim records the publish in the row
    version it writes anyway; the marker's statement then finds nothing to
    change. Recorded at once, most tasks of a busy queue got a row version of
    their own for the marker (a non-HOT update with an entry in every index;
    figures: docs/benchmark.md). Only tasks still waiting in the
    broker (a backlog, or a delay) get one now, well within the relay's minimum age.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 0.05,
        delay: float = MARK_DELAY,
        batch: int = 1000,
    ) -> None:
        self._store = store
        self._interval = interval
        self._delay = delay
        self._batch = batch
        # (confirmed at, task id, generation), oldest first.
        self._pending: collections.deque[tuple[float, uuid.UUID, int]] = collections.deque()
        self._handed: list[uuid.UUID] = []

    def add(self, task_id: uuid.UUID, generation: int) -> None:
        self._pending.append((time.monotonic(), task_id, generation))

    def hand_over(self, task_id: uuid.UUID) -> None:
        self._handed.append(task_id)

    name = "taskq-marker"

    async def _start(self) -> None:
        self._spawn(self._run(), self.name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush(time.monotonic() - self._delay)

    async def flush(self, confirmed_before: float = math.inf) -> None:
        """Record the publishes confirmed before ``confirmed_before`` (all by default),
        ``batch`` rows a statement, and wake the relay for the rows handed to it."""
        pending = self._pending
        while pending and pending[0][0] <= confirmed_before:
            due: list[tuple[float, uuid.UUID, int]] = []
            while pending and pending[0][0] <= confirmed_before and len(due) < self._batch:
                due.append(pending.popleft())
            try:
                await self._store.mark_published([(task_id, gen) for _, task_id, gen in due])
            except StoreError as exc:
                # The rows stay owed; the relay publishes them again (a harmless duplicate).
                # The rest waits for the next pass rather than for more failing statements.
                log.warning("could not record %d publishes: %s", len(due), exc)
                break
            except asyncio.CancelledError:
                # Stopped mid-statement (close() cancels the loop): close() flushes them.
                pending.extendleft(reversed(due))
                raise
        handed, self._handed = self._handed, []
        if handed:
            try:
                await self._store.notify_owed(handed)
            except StoreError as exc:
                # Owed all the same: the relay's pass after its grace publishes them.
                log.warning("could not wake the relay for %d envelopes: %s", len(handed), exc)
            except asyncio.CancelledError:
                self._handed = handed + self._handed
                raise

    async def _stop(self, timeout: float) -> None:
        """Stop the loop, then record every publish confirmed so far."""
        await self._cancel_tasks()
        await self.flush()
