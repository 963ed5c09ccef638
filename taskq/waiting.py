"""Waiting for tasks to end: one LISTEN connection per process, fanned out in memory.

``Client.wait`` and ``GET /tasks/{id}?wait=`` wait here. Nothing polls: a task
somebody waits for is marked (``tasks.wait_requested``), and its terminal
transition sends a NOTIFY carrying its id on :func:`taskq.store.finished_channel`
(migration 0008). Tasks nobody waits for send nothing, so they pay nothing.

A waiter is race-free by its order: it registers in memory, makes sure the
connection LISTENs, marks its task (the mark also says whether the task has
ended already), and only then awaits its wake-up; a notification that arrives
in between is not lost, it sets the waiter's event. When the connection drops
(a restart, ``pg_terminate_backend``, a network failure) it is opened again and
every waiter reads its task once more, since a notification sent meanwhile
went to nobody. While waiters wait, the connection is checked every
:data:`CHECK_EVERY` seconds, so a half-open one is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import uuid
from typing import Any

from taskq import store as store_
from taskq.errors import (
    FieldError,
    InvalidRequest,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TooManyWaiters,
    WaitTimeout,
)
from taskq.model import TaskRecord, TaskStatus
from taskq.service import Service
from taskq.store import Store

log = logging.getLogger("taskq.waiting")
# Seconds between tries to open the LISTEN connection again.
RECONNECT_EVERY = 1.0
# Seconds between checks of the connection while somebody waits, and how long one may take.
CHECK_EVERY = 5.0
CHECK_TIMEOUT = 5.0


class Waiters(Service):
    """The waiters of one process and the connection that wakes them.

    Started by its owner (a :class:`~taskq.client.Client`) at the first wait; a
    process that never waits opens no connection for it.

    Args:
        store: the database.
        database_url: for the dedicated LISTEN connection.
        limit: how many waits may be in progress at once (``TASKQ_MAX_WAITERS``).
    """

    name = "taskq-waiters"

    def __init__(self, store: Store, database_url: str, *, limit: int) -> None:
        self.store = store
        self.database_url = database_url
        self.limit = limit
        self._waiting: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._count = 0
        self._listening = asyncio.Event()
        self._lost = asyncio.Event()
        self._connection: Any = None
        #: How often the connection was opened (1 after the first; more after drops).
        self.connects = 0

    @property
    def waiting(self) -> int:
        """How many waits are in progress."""
        return self._count

    async def _start(self) -> None:
        self._spawn(self._keep_listening(), "taskq-waiters-listen")

    async def _stop(self, timeout: float) -> None:
        await self._cancel_tasks()
        self._close()
        self._wake_all()  # each reads its task once more and ends or times out

    async def wait(self, task_id: uuid.UUID, timeout: float) -> TaskRecord:
        """The task once it has ended, or as it is after ``timeout`` seconds.

        Raises:
            TaskNotFound: no such task.
            TooManyWaiters: :attr:`limit` waits are in progress already.
            StoreError: the database failed.
        """
        if self._count >= self.limit:
            raise TooManyWaiters(self.limit)
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        event = asyncio.Event()
        self._count += 1
        self._waiting.setdefault(task_id, set()).add(event)
        try:
            marked = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listening.wait(), max(0.0, deadline - loop.time()))
                marked = task_id in await self.store.request_wait([task_id])
            while True:
                if not marked:  # else: it was ENQUEUED or RUNNING, nothing to read yet
                    event.clear()
                    task = await self.store.task(task_id)
                    if task is None:
                        raise TaskNotFound(task_id)
                    if task.status.terminal or loop.time() >= deadline:
                        return task
                marked = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), max(0.0, deadline - loop.time()))
        finally:
            self._count -= 1
            events = self._waiting.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[task_id]

    # ---------------------------------------------------------------- the connection

    async def _keep_listening(self) -> None:
        while True:
            self._lost.clear()
            try:
                self._connection = await store_.listen(
                    self.database_url,
                    self.store.finished_channel,
                    self._on_notify,
                    self._lost.set,
                    name=f"taskq waiters, pid {os.getpid()}",
                )
            except Exception as exc:  # a StoreError, or anything the driver raised
                log.warning("cannot listen for finished tasks (trying again): %s", exc)
                await asyncio.sleep(RECONNECT_EVERY)
                continue
            self.connects += 1
            self._listening.set()
            # A task that ended while nobody listened notified no one: read them all.
            self._wake_all()
            await self._watch()
            self._listening.clear()
            self._close()
            log.warning("the connection listening for finished tasks was lost; opening another")

    async def _watch(self) -> None:
        """Return once the connection is lost (checked every CHECK_EVERY s while in use)."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), CHECK_EVERY)
            if self._lost.is_set() or not self._waiting:
                continue
            try:
                await store_.session_alive(self._connection, CHECK_TIMEOUT)
            except Exception as exc:
                log.warning("the connection listening for finished tasks failed: %s", exc)
                return

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()

    def _on_notify(self, payload: str) -> None:
        try:
            task_id = uuid.UUID(payload)
        except ValueError:
            return
        for event in self._waiting.get(task_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiting.values():
            for event in events:
                event.set()


def check_wait(task_id: object, timeout: object) -> tuple[uuid.UUID, float]:
    """A wait's task id and timeout, checked.

    Raises:
        InvalidRequest: naming ``task_id`` or ``timeout``.
    """
    errors = []
    ident = None
    if isinstance(task_id, uuid.UUID):
        ident = task_id
    elif isinstance(task_id, str):
        with contextlib.suppress(ValueError):
            ident = uuid.UUID(task_id)
    if ident is None:
        errors.append(FieldError("task_id", "must be a task id (a UUID)"))
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        errors.append(FieldError("timeout", "must be a number of seconds, 0 or more"))
    if errors:
        raise InvalidRequest(errors)
    assert ident is not None and isinstance(timeout, int | float)
    return ident, float(timeout)


def outcome(task: TaskRecord, timeout: float, *, cancel_reason: str | None = None) -> TaskRecord:
    """What a wait that ended with ``task`` answers: the task if it SUCCEEDED.

    ``cancel_reason`` is the reason an operator gave for a cancel (from its history).

    Raises:
        TaskFailed, TaskCancelled: it ended so, with the reason.
        WaitTimeout: it has not ended.
    """
    if task.status is TaskStatus.SUCCEEDED:
        return task
    if task.status is TaskStatus.FAILED:
        raise TaskFailed(task, task.last_error or "failed")
    if task.status is TaskStatus.CANCELLED:
        raise TaskCancelled(task, cancel_reason or task.last_error or "cancelled")
    raise WaitTimeout(task, timeout)
