"""Paused work queues as a worker follows them: a LISTEN connection, and a re-read
every heartbeat interval as the safety net.

``POST /queues/{q}/pause`` (or ``taskq queues pause``) writes a row of
``queue_pauses``, and the same statement NOTIFYs :func:`taskq.store.queues_channel`
when it commits; a resume deletes the row and notifies likewise (migration 0014).
A worker

- reads the paused queues before it consumes anything, so that a worker starting
  while a queue is paused never consumes it;
- keeps one connection LISTENing on the channel (:class:`PauseFollower`) and reads
  the table again, on that connection, when a notification comes, when the
  connection was opened again after a drop (a notification sent meanwhile went to
  nobody), and every ``check_every`` seconds (its heartbeat interval): that read
  catches a lost notification and proves the connection alive, so a half-open
  one is noticed too;
- applies what changed for the queues it consumes (``Worker._apply_pauses``): on a
  pause it cancels its consumer of the queue and gives the deliveries it had
  prefetched back to the broker unclaimed (nacked with requeue; they come back
  marked redelivered, so they are never run inline, see :mod:`taskq.worker.inline`);
  a claim already in flight goes on and tasks already running finish normally.
  On a resume it consumes the queue again.

The claim and the outcomes never look at pauses: a queue's pause costs nothing to
the tasks of other queues but one set lookup per delivery while some queue of the
worker is paused (see :class:`taskq.worker.consumer.Consumers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from taskq import store as store_
from taskq.errors import StoreError
from taskq.service import Service
from taskq.store import Store

log = logging.getLogger("taskq.worker")

# Seconds between tries to open the LISTEN connection again.
RECONNECT_EVERY = 1.0
# How long one read of the paused queues may take on the listening connection.
CHECK_TIMEOUT = 5.0


class PauseFollower(Service):
    """Calls ``apply`` with the paused queues' names whenever they may have changed.

    Args:
        store: the database.
        database_url: for the dedicated LISTEN connection.
        apply: takes the names of every paused queue (of the whole install); called
            after each read, also when nothing changed.
        check_every: seconds between reads when no notification comes.
    """

    name = "taskq-queue-pauses"

    def __init__(
        self,
        store: Store,
        database_url: str,
        *,
        apply: Callable[[frozenset[str]], Awaitable[None]],
        check_every: float,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.check_every = check_every
        self._apply = apply
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        #: How often the connection was opened (1 after the first; more after drops).
        self.connects = 0
        #: Reads of the paused queues done.
        self.reads = 0

    async def _start(self) -> None:
        self._spawn(self._run(), self.name)

    async def _run(self) -> None:
        while True:
            self._lost.clear()
            try:
                connection = await store_.listen(
                    self.database_url,
                    self.store.queues_channel,
                    self._on_notify,
                    self._on_lost,
                    name=f"taskq queue pauses, pid {os.getpid()}",
                )
            except Exception as exc:  # a StoreError, or anything the driver raised
                log.warning("cannot listen for queue pauses (trying again): %s", exc)
                await asyncio.sleep(RECONNECT_EVERY)
                continue
            self.connects += 1
            try:
                await self._follow(connection)
            except StoreError as exc:
                log.warning("reading the paused queues failed (listening again): %s", exc)
                await asyncio.sleep(RECONNECT_EVERY)
            finally:
                if not connection.is_closed():
                    connection.terminate()

    async def _follow(self, connection: Any) -> None:
        """Read and apply until the connection is lost (a failed read raises StoreError)."""
        while not self._lost.is_set():
            self._changed.clear()  # before the read: a notification during it reads again
            pauses = await self.store.queue_pauses(connection, CHECK_TIMEOUT)
            self.reads += 1
            try:
                await self._apply(frozenset(pause.queue for pause in pauses))
            except Exception:
                log.exception("applying the paused queues failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.check_every)

    def _on_notify(self, payload: str) -> None:
        self._changed.set()

    def _on_lost(self) -> None:
        self._lost.set()
        self._changed.set()
