"""The enqueue: batched inserts, idempotent replays, unique keys and their debounce."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from taskq.model import EnqueueOutcome
from taskq.store._base import StoreBase
from taskq.store._callers import _Asyncpg, _psycopg, _Statements
from taskq.store._records import _CREATED, Enqueued, NewTask, _answer, _duplicate

# Rounds of looking up the holders of unique keys, and inserting again those whose
# holder let go meanwhile, before a task that finds none is taken as refused for its type.
UNIQUE_ROUNDS = 5


class _Rollback(Exception):
    def __init__(self, results: list[Enqueued]) -> None:
        self.results = results


class EnqueueStore(StoreBase):
    """Enqueuing tasks, on the pool or in a caller's transaction."""

    async def enqueue(
        self,
        tasks: Sequence[NewTask],
        connection: Any = None,
        *,
        all_or_nothing: bool = False,
    ) -> list[Enqueued]:
        """Insert ``tasks`` in one statement, in one transaction unless ``connection`` is given.

        With ``all_or_nothing``, a conflict or an unknown type among them rolls the
        whole transaction back (nothing is created; the results say why).

        With ``connection`` (asyncpg's, or psycopg 3's, sync or async), the rows join
        the caller's open transaction and the relay is notified, so they are published
        once (and only if) it commits. A sync psycopg connection runs the statements
        in a thread, while its owner waits for the answer (a :class:`taskq.SyncClient`).

        Otherwise, unless ``all_or_nothing``, the insert runs as a statement of its
        own, which Postgres commits by itself: one round trip, where BEGIN, the
        insert and COMMIT took three. A single statement is atomic all the same,
        and the idempotent replays it skipped are committed rows, read after it.
        """
        if connection is not None:
            caller = _psycopg(connection, self.schema)
            if caller is not None:
                return await self._enqueue_in(caller, tasks)
        async with self._connection(connection) as conn:
            statements = _Asyncpg(conn, self.q)
            if connection is not None:
                return await self._enqueue_in(statements, tasks)
            if not all_or_nothing:
                return await self._enqueue(statements, tasks)
            try:
                async with conn.transaction():
                    results = await self._enqueue(statements, tasks)
                    if all_or_nothing and any(r.outcome.refused for r in results):
                        raise _Rollback(results)
            except _Rollback as rollback:
                return rollback.results
            return results

    async def _enqueue_in(self, conn: _Statements, tasks: Sequence[NewTask]) -> list[Enqueued]:
        """Enqueue in a caller's transaction, all or nothing, and wake the relay at commit.

        One task is all or nothing by itself (its one row); a batch runs under a
        savepoint (see ``enqueue_savepoint`` SQL), rolled back to when a task of it
        is refused, so that the caller's transaction keeps none of it.
        """
        if len(tasks) < 2:
            results = await self._enqueue(conn, tasks)
        else:
            begin, done, undo = (
                ("enqueue_savepoint", "enqueue_savepoint_release", "enqueue_savepoint_rollback")
                if conn.in_transaction()
                else ("enqueue_begin", "enqueue_commit", "enqueue_rollback")
            )
            await conn.execute(begin)
            try:
                results = await self._enqueue(conn, tasks)
            except BaseException:
                with contextlib.suppress(Exception):  # the first error says what went wrong
                    await conn.execute(undo)
                raise
            if any(r.outcome.refused for r in results):
                await conn.execute(undo)
                return results
            await conn.execute(done)
        # In the caller's transaction a NOTIFY is delivered when it commits; after a
        # transaction of our own, at once.
        await self._notify([r.task_id for r in results if r.owes_publish], conn)
        return results

    async def _enqueue(self, conn: _Statements, tasks: Sequence[NewTask]) -> list[Enqueued]:
        inserted = await self._insert(conn, tasks)
        keys = [t.idempotency_key for t in tasks if t.id not in inserted and t.idempotency_key]
        existing = {}
        if keys:
            for row in await conn.fetch("enqueue_existing", keys):
                existing[row["idempotency_key"]] = row
        results: list[Enqueued] = []
        contested = []  # tasks whose unique key another task holds
        for index, task in enumerate(tasks):
            new = inserted.get(task.id)
            if new is not None:
                results.append(
                    Enqueued(
                        _CREATED, _answer(new), new["delay"], new["generation"], task.traceparent
                    )
                )
                continue
            found = existing.get(task.idempotency_key) if task.idempotency_key else None
            if found is None:
                results.append(Enqueued(EnqueueOutcome.UNKNOWN_TYPE))
                if task.unique is not None:
                    contested.append(index)
            elif found["request_fingerprint"] == task.fingerprint:
                results.append(Enqueued(EnqueueOutcome.REPLAYED, _answer(found)))
            else:
                results.append(Enqueued(EnqueueOutcome.CONFLICT, _answer(found)))
        if contested:
            await self._contest(conn, tasks, results, contested)
        return results

    async def _insert(
        self, conn: _Statements, tasks: Sequence[NewTask]
    ) -> dict[uuid.UUID, Mapping[str, Any]]:
        """Insert what may be inserted of ``tasks``: the rows by id. A batch without a
        unique task runs ``enqueue``, which knows nothing of unique keys (and costs what
        it cost before them); one with a unique task, ``enqueue_unique``."""
        columns = [
            [t.id for t in tasks],
            [t.type for t in tasks],
            [t.queue for t in tasks],
            [t.payload_json for t in tasks],
            [t.max_attempts for t in tasks],
            [t.idempotency_key for t in tasks],
            [t.fingerprint for t in tasks],
            [t.timeout for t in tasks],
            [t.run_at for t in tasks],
            [t.delay for t in tasks],
            [t.traceparent for t in tasks],
        ]
        if any(t.unique is not None for t in tasks):
            held = [t.unique for t in tasks]
            rows = await conn.fetch(
                "enqueue_unique",
                *columns,
                [u and u.key for u in held],
                [u and u.while_ for u in held],
                [u and u.for_seconds for u in held],
            )
        else:
            rows = await conn.fetch("enqueue", *columns)
        return {row["id"]: row for row in rows}

    async def _contest(
        self,
        conn: _Statements,
        tasks: Sequence[NewTask],
        results: list[Enqueued],
        pending: list[int],
    ) -> None:
        """Answer the tasks at ``pending``, whose insert met a holder of their unique key:
        the holder answers (a duplicate), or takes their payload and run_at (replace).

        The unique index decided (see migration 0011); what is read here only says who
        holds the key. A holder whose "for" has passed is released and the task inserted
        again; so is one that let the key go meanwhile (it started, ended or was
        replaced too late): the next round looks again. A task that finds no holder in
        any round was skipped for its type (unknown or disabled): it stays UNKNOWN_TYPE.
        """
        for _ in range(UNIQUE_ROUNDS):
            keys = sorted({u.key for i in pending if (u := tasks[i].unique) is not None})
            holders = {
                row["unique_key"]: row for row in await conn.fetch("enqueue_unique_holders", keys)
            }
            expired = [row["id"] for row in holders.values() if row["expired"]]
            if expired:
                await conn.execute("enqueue_unique_release", expired)
            again: list[int] = []
            replacing: dict[uuid.UUID, list[int]] = {}
            for index in pending:
                unique = tasks[index].unique
                holder = None if unique is None else holders.get(unique.key)
                if holder is None or holder["expired"]:
                    again.append(index)
                elif unique is not None and unique.replace and holder["replaceable"]:
                    replacing.setdefault(holder["id"], []).append(index)
                else:
                    results[index] = Enqueued(EnqueueOutcome.DUPLICATE, _duplicate(holder, False))
            if replacing:
                again += await self._replace(conn, tasks, results, replacing)
            if not again:
                return
            again.sort()
            inserted = await self._insert(conn, [tasks[i] for i in again])
            pending = []
            for index in again:
                new = inserted.get(tasks[index].id)
                if new is None:
                    pending.append(index)
                    continue
                results[index] = Enqueued(
                    _CREATED, _answer(new), new["delay"], new["generation"],
                    tasks[index].traceparent,
                )  # fmt: skip
            if not pending:
                return

    async def _replace(
        self,
        conn: _Statements,
        tasks: Sequence[NewTask],
        results: list[Enqueued],
        replacing: dict[uuid.UUID, list[int]],
    ) -> list[int]:
        """Debounce: each holder takes the payload and run_at of the last of its
        duplicates (in the batch's order). Returns the duplicates whose holder had
        started meanwhile, to be looked at again."""
        ids = list(replacing)
        last = [tasks[replacing[holder][-1]] for holder in ids]
        rows = await conn.fetch(
            "enqueue_replace",
            ids,
            [t.payload_json for t in last],
            [t.run_at for t in last],
            [t.delay for t in last],
        )
        replaced = {row["id"]: row for row in rows}
        again = []
        for holder_id, group in replacing.items():
            row = replaced.get(holder_id)
            if row is None:
                again += group
                continue
            for index in group:
                results[index] = Enqueued(
                    EnqueueOutcome.REPLACED, _duplicate(row, True), row["delay"],
                    row["generation"], row["traceparent"],
                    republish=row["republish"] and index == group[-1],
                )  # fmt: skip
        return again
