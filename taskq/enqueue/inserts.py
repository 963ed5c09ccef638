"""Single enqueues from many concurrent callers, grouped into batched INSERT statements.

One statement runs at a time and takes everything queued when it starts (up to
:data:`MAX_INSERT_BATCH` rows): a request that comes while nothing runs is
inserted at once, and under load the batches grow with the load (what comes
while a statement runs goes into the next one). Several statements at once, as
before, made smaller batches for no more throughput and cost Postgres more per
request (figures: docs/benchmark.md).

A statement that waits (for the lock of an idempotency key another transaction
is inserting, say) must not hold up every request behind it: once it has run for
:data:`STALL_SECONDS`, the next batch starts beside it, up to
:data:`MAX_STATEMENTS` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from taskq.errors import RejectedByDatabase
from taskq.service import Service
from taskq.store import Enqueued, NewTask, Store

log = logging.getLogger("taskq.inserts")

MAX_INSERT_BATCH = 500
MAX_STATEMENTS = 4
# Far beyond a statement's normal time (docs/benchmark.md, "Figures behind the code").
STALL_SECONDS = 0.05

_Item = tuple[NewTask, "asyncio.Future[Enqueued]"]


class InsertBatcher(Service):
    """Groups concurrent single enqueues into batched INSERT statements.

    Args:
        store: the database.
        on_inserted: called with each statement's results before their callers
            resume (the client hands the created rows to its outbox from here, so
            the publish starts before the answers are written).
    """

    def __init__(
        self, store: Store, on_inserted: Callable[[Sequence[Enqueued]], None] | None = None
    ) -> None:
        self._store = store
        self._on_inserted = on_inserted
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._running: set[asyncio.Task[None]] = set()

    name = "taskq-insert"

    async def _start(self) -> None:
        self._spawn(self._dispatch(), self.name)

    async def submit(self, task: NewTask) -> Enqueued:
        """Insert ``task`` with the others queued meanwhile (once started)."""
        future: asyncio.Future[Enqueued] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((task, future))
        return await future

    async def _dispatch(self) -> None:
        while True:
            first = await self._queue.get()
            if len(self._running) >= MAX_STATEMENTS:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
            batch = [first]
            while len(batch) < MAX_INSERT_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            statement = asyncio.create_task(self._insert(batch), name="taskq-insert-statement")
            self._running.add(statement)
            statement.add_done_callback(self._running.discard)
            # Usually the statement ends first; the next batch forms meanwhile.
            await asyncio.wait((statement,), timeout=STALL_SECONDS)

    async def _insert(self, batch: list[_Item]) -> None:
        try:
            results = await self._store.enqueue([task for task, _ in batch])
        except RejectedByDatabase as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            # One row the database refuses must not fail the requests that
            # shared its statement: insert them one by one.
            for item in batch:
                try:
                    self._resolve([item], await self._store.enqueue([item[0]]))
                except Exception as exc:
                    self._fail([item], exc)
            return
        except Exception as exc:  # every waiter gets the error; the next batch goes on
            self._fail(batch, exc)
            return
        self._resolve(batch, results)

    def _resolve(self, batch: list[_Item], results: list[Enqueued]) -> None:
        if self._on_inserted is not None:
            try:
                self._on_inserted(results)
            except Exception:  # the rows stay owed: the relay publishes them
                log.exception("handing %d inserted rows on failed", len(results))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Item], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def _stop(self, timeout: float) -> None:
        """Cancel the dispatcher and the statements running (their callers get the
        cancellation)."""
        tasks = [*self._tasks, *self._running]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
