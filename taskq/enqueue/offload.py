"""CPU-bound checks of user input, run off the event loop with a deadline.

A JSON Schema written by a user can make validation slow: ``uniqueItems`` over a
long array of objects is quadratic, nested ``anyOf`` exponential. Such checks run
here, in a few threads of their own, so that the event loop goes on serving every
other request meanwhile (pure-Python work gives the loop the GIL every few
milliseconds; regular expressions run on RE2, which is linear).

On overrun, the caller gets :class:`Overrun` at the deadline and the job is
interrupted: an exception is raised inside its thread at its next Python
instruction (``PyThreadState_SetAsyncExc``), and that thread is replaced by a
fresh one. A job still waiting for a thread at its deadline is never started: the
caller gets :class:`Busy`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

# Defined in taskq.errors; importing them from here keeps working.
from taskq.errors import Busy as Busy
from taskq.errors import Overrun as Overrun

log = logging.getLogger("taskq.offload")
T = TypeVar("T")
THREADS = 2


class _Interrupt(BaseException):
    """Raised inside a job's thread once its caller's deadline has passed."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned job's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


class _Job:
    __slots__ = ("args", "fn", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class Offload:
    """A few threads that run checks with a deadline (started on first use).

    Args:
        threads: how many checks run at once; more wait for a thread.
        name: the threads' name prefix.
    """

    def __init__(self, threads: int = THREADS, name: str = "taskq-check") -> None:
        self._size, self._name = threads, name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._running: dict[int, _Job] = {}  # thread ident -> its job; guarded by _lock
        self._closed = False
        self.interrupted = 0

    async def run(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread; its result or exception.

        Raises:
            Overrun: it ran past ``deadline`` seconds (it is interrupted).
            Busy: no thread was free before ``deadline``.
        """
        job = _Job(fn, args)
        with self._lock:
            if self._closed:
                raise RuntimeError("the offload is closed")
            while len(self._threads) < self._size:
                self._spawn()
        self._jobs.put(job)
        waiting = asyncio.wrap_future(job.future)
        try:
            # shielded: the timeout must not cancel the job's future, whose
            # state tells a job that never started from one that overran.
            return await asyncio.wait_for(asyncio.shield(waiting), deadline)
        except TimeoutError:
            waiting.add_done_callback(_retrieve)
            with self._lock:
                if job.future.cancel():  # still queued: it never starts
                    raise Busy() from None
                ident = next((t for t, j in self._running.items() if j is job), None)
                if ident is not None and job.future.running():
                    del self._running[ident]
                    self.interrupted += 1
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(ident), ctypes.py_object(_Interrupt)
                    )
                    raise Overrun() from None
            # It finished between the deadline and the lock.
            result: T = job.future.result(timeout=1.0)
            return result

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.get_ident()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                with self._lock:
                    self._running[me] = job
                try:
                    started = job.future.set_running_or_notify_cancel()
                    result = job.fn(*job.args) if started else None
                finally:
                    with self._lock:
                        self._running.pop(me, None)
                if started:
                    job.future.set_result(result)
            except _Interrupt:
                # The interrupt lands anywhere in this iteration: end the thread,
                # whose state is no longer trusted, and start another.
                log.warning("a check ran past its deadline and was interrupted")
                if job.future.running():
                    job.future.set_exception(Overrun())
                with self._lock:
                    self._threads.discard(threading.current_thread())
                    if not self._closed:
                        self._spawn()
                return
            except BaseException as exc:
                if job.future.running():
                    job.future.set_exception(exc)

    def close(self) -> None:
        """Stop the threads once their jobs are done (a running job is not waited for)."""
        with self._lock:
            self._closed = True
            count = len(self._threads)
        for _ in range(count):
            self._jobs.put(None)
