"""The threads that run sync handlers.

A plain ``def`` handler runs in one of these threads, so it may block (longer
than the lease, too) while the event loop goes on heartbeating. At most
``size`` run at once: a call first takes a *place* (waiting for one if all are
taken), then a thread, reused from the idle ones or started for it.

Python cannot stop a thread. When the worker stops waiting for a handler (its
timeout, an operator's cancel, a shutdown) the call is *abandoned*: its thread
runs on until the handler returns, and the result is thrown away. So that
abandoned threads cannot eat the pool for good, an abandoned call gives its
place up at once and a new thread serves the next call, as long as at most
``size`` calls are abandoned and still running; past that, an abandoned call
keeps its place until it returns, and each such call is logged as an error
(the process needs a restart to get its capacity back). The threads are
daemons: the process exits without waiting for them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger("taskq.worker")

T = TypeVar("T")


class Job(Generic[T]):
    """One call in a thread; ``future`` holds what it returned."""

    __slots__ = ("abandoned", "call", "future", "has_place", "loop")

    def __init__(self, call: Callable[[], T], loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.abandoned = False
        self.has_place = True


class HandlerThreads:
    """A pool of daemon threads with ``size`` places (see the module's docstring).

    Every method but the threads' own loop runs on the event loop's thread.

    Args:
        size: calls running at once (and abandoned calls replaced at most).
        on_abandoned: called with the number of abandoned calls still running
            whenever it changes.
    """

    def __init__(self, size: int, on_abandoned: Callable[[int], None] | None = None) -> None:
        self.size = size
        self.abandoned = 0
        self._on_abandoned = on_abandoned
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._jobs: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, under _lock
        self._closed = False
        self._started = 0

    def take(self) -> bool:
        """Take a place if one is free now and nobody waits for one; False: none is.
        A place taken and not used by :meth:`start` goes back with :meth:`give_back`."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    def give_back(self) -> None:
        """Give back a place taken and not used (the next in line gets it)."""
        self._release()

    def reserve(self) -> asyncio.Future[None] | None:
        """Take a place: ``None`` if one was free, else a future done once one is ours."""
        if self.take():
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def unreserve(self, waiter: asyncio.Future[None]) -> None:
        """Stop waiting for a place; one given meanwhile goes to the next in line."""
        if waiter.done():
            self.give_back()
        else:
            waiter.cancel()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def start(self, call: Callable[[], T]) -> Job[T]:
        """Run ``call`` in a thread, in a place taken with :meth:`reserve`.

        ``call`` must not raise (a handler's call catches everything).
        """
        job = Job(call, asyncio.get_running_loop())
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return job
            self._started += 1
            name = f"taskq-handler-{self._started}"
        threading.Thread(target=self._serve, args=(job,), name=name, daemon=True).start()
        return job

    def abandon(self, job: Job[Any]) -> bool:
        """Stop waiting for ``job``; returns whether it was still running."""
        if job.future.done() or job.abandoned:
            return False
        job.abandoned = True
        self.abandoned += 1
        if self.abandoned <= self.size:
            job.has_place = False
            self._release()
        else:
            log.error(
                "%d abandoned handler threads are still running, more than the %d that get a"
                " replacement: this one keeps its place until it returns (%d of %d places"
                " left); restart the worker to get them back",
                self.abandoned,
                self.size,
                self.size - (self.abandoned - self.size),
                self.size,
            )
        self._changed()
        return True

    def close(self) -> None:
        """Let the idle threads end; running ones end after their call."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)
        if self.abandoned:
            log.warning(
                "%d abandoned handler threads still running; the process exits without them",
                self.abandoned,
            )

    def _serve(self, job: Job[Any] | None) -> None:
        """A thread's loop: run a job, hand its result to the event loop, wait for the next."""
        while job is not None:
            try:
                result = job.call()
            except BaseException:  # a bug: the call catches what the handler raises
                log.exception("a handler thread's call raised")
                result = None
            # A closed event loop refuses it: nobody waits for the job any more.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(self._finished, job, result)
            with self._lock:
                if self._closed or self._idle >= self.size:
                    return
                self._idle += 1
            job = self._jobs.get()

    def _finished(self, job: Job[Any], result: object) -> None:
        if job.has_place:
            job.has_place = False
            self._release()
        if job.abandoned:
            self.abandoned -= 1
            self._changed()
        elif not job.future.done():
            job.future.set_result(result)

    def _changed(self) -> None:
        if self._on_abandoned is not None:
            self._on_abandoned(self.abandoned)
