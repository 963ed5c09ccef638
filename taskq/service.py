"""The one lifecycle of taskq's background parts.

Every part that runs in the background (the broker link, the outbox and its
marker, the relay, the sweeper, the consumers, the claimer, the recorder, the
insert batcher, a worker's periodic loops, the client and the worker
themselves) is a :class:`Service`:

- ``await part.start()`` starts it and returns once it runs. Starting a part
  that runs already does nothing, so an owner may start what it was handed.
- ``await part.stop(timeout)`` stops it: the part finishes the work in hand for
  at most ``timeout`` seconds (``None``: the part's own default), then cancels
  the rest. Stopping a part twice, or one that never started, does nothing.
- A part runs once: starting it again after a stop raises ``RuntimeError``
  (it holds state, such as a closed channel or a flushed marker, that a second
  run would have to rebuild; build a new part instead).

A part is built in ``__init__`` with all of its configuration; ``start()``
takes no arguments. :class:`Services` starts a list of parts in order and
stops them in reverse, so a part stops before the parts it uses.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("taskq.service")


@runtime_checkable
class Startable(Protocol):
    """What an owner needs of a part: the two methods of the contract."""

    async def start(self) -> None: ...

    async def stop(self, timeout: float | None = None) -> None: ...


class State(enum.Enum):
    """Where a :class:`Service` is in its life."""

    NEW = "new"  #: built, not started (stop does nothing)
    RUNNING = "running"  #: started (start does nothing)
    STOPPED = "stopped"  #: stopped (stop does nothing, start raises)


def raise_if_cancelled() -> None:
    """Raise :class:`asyncio.CancelledError` if the current task was asked to stop.

    For the loops of background parts: a call that drops a cancellation (an
    aio-pika channel open cancelled at the wrong moment returns as usual;
    Python 3.11's :func:`asyncio.wait_for` when the awaited event is set as the
    cancel comes) or turns it into an error the loop catches
    leaves the request pending on the task (:meth:`asyncio.Task.cancelling`)
    while the loop goes on: the part's stop would wait for it for ever. Call
    this once per turn of such a loop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError(f"{task.get_name()} was cancelled")


class Service:
    """Base class of the background parts: the contract above, once, for all.

    Subclasses implement :meth:`_start` and :meth:`_stop`; :meth:`_spawn` runs a
    coroutine in a task that :meth:`_cancel_tasks` cancels and awaits.
    """

    #: The part's name in task names and messages.
    name = "taskq-service"
    #: ``stop()``'s timeout when none is given.
    stop_timeout: float = 5.0

    _state: State = State.NEW

    @property
    def _tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks of :meth:`_spawn` (subclasses need not call an ``__init__`` here)."""
        tasks: list[asyncio.Task[Any]] = self.__dict__.setdefault("_service_tasks", [])
        return tasks

    @property
    def state(self) -> State:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is State.RUNNING

    async def start(self) -> None:
        """Start the part; does nothing if it runs already.

        Raises:
            RuntimeError: the part was stopped (parts run once).
        """
        if self._state is State.RUNNING:
            return
        if self._state is State.STOPPED:
            raise RuntimeError(f"{self.name} was stopped and cannot start again")
        self._state = State.RUNNING
        try:
            await self._start()
        except BaseException:
            # What it opened is closed; it cannot run again.
            await self._stop_once(0.0)
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the part, finishing the work in hand for at most ``timeout`` seconds
        (default :attr:`stop_timeout`); does nothing if it is not running."""
        if self._state is not State.RUNNING:
            return
        await self._stop_once(self.stop_timeout if timeout is None else timeout)

    async def _stop_once(self, timeout: float) -> None:
        self._state = State.STOPPED
        try:
            await self._stop(timeout)
        finally:
            await self._cancel_tasks()

    async def _start(self) -> None:
        """Start the part's work (the state is RUNNING already)."""

    async def _stop(self, timeout: float) -> None:
        """Finish within ``timeout`` seconds; tasks from :meth:`_spawn` are cancelled after."""

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str | None = None) -> None:
        """Run ``coroutine`` in a task of this part, cancelled when it stops."""
        self._tasks.append(asyncio.create_task(coroutine, name=name or self.name))

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self._state.value}>"


class Loop(Service):
    """Runs ``work`` in a task from :meth:`start` until :meth:`stop` cancels it.

    For loops that hold nothing to finish (a heartbeat, a periodic reload).
    """

    def __init__(self, work: Callable[[], Awaitable[object]], *, name: str) -> None:
        self._work = work
        self.name = name

    async def _start(self) -> None:
        self._spawn(self._run(), self.name)

    async def _run(self) -> None:
        await self._work()


class OnStop(Service):
    """Calls ``close`` when stopped: gives a resource that is no service (a pool, a
    channel) its place in a :class:`Services` group, so it closes after the parts
    added after it."""

    def __init__(self, close: Callable[[], Awaitable[object]], *, name: str) -> None:
        self._close = close
        self.name = name

    async def _stop(self, timeout: float) -> None:
        await self._close()


class Services(Service):
    """Parts started in order and stopped in reverse, as one part.

    A part added while the group runs is started at once. If a part fails to
    start, the parts started before it are stopped and the error goes on.
    ``stop(timeout)`` gives each part ``timeout`` (or its own default).
    """

    def __init__(self, parts: Iterable[Startable] = (), *, name: str = "taskq-services") -> None:
        self.name = name
        self._parts: list[Startable] = list(parts)
        self._started: list[Startable] = []

    async def add(self, part: Startable) -> None:
        """Add ``part`` last (it stops first); start it if the group runs."""
        self._parts.append(part)
        if self.running:
            await part.start()
            self._started.append(part)

    async def _start(self) -> None:
        for part in self._parts:
            await part.start()
            self._started.append(part)

    async def stop(self, timeout: float | None = None) -> None:
        self._given = timeout
        await super().stop(timeout)

    async def _stop(self, timeout: float) -> None:
        given = getattr(self, "_given", timeout)
        while self._started:
            part = self._started.pop()
            try:
                await part.stop(given)
            except Exception:
                log.exception("stopping %r failed", part)
