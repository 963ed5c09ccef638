"""The only module that runs SQL: every statement comes from ``sql/queries.sql``.

It runs them through asyncpg, and the enqueue also on a caller's psycopg 3
connection (sync or async), in the caller's transaction (see :meth:`Store.enqueue`).
Driver errors stay inside; callers see :class:`~taskq.errors.StoreError`
(but for the lock-session statements, whose every error means a lost lock to
:mod:`taskq.fleet.leader`). Methods that take lists run one statement for the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import orjson

import taskq.sql as sql
from taskq.errors import (
    LimiterInUse,
    RejectedByDatabase,
    StoreError,
    TooManyLimiters,
    TooManySchedules,
    TooManyTaskTypes,
    UnknownLimiter,
)
from taskq.model import (
    STATUS_BY_TEXT,
    ClaimedTask,
    Concurrency,
    ConcurrencyKey,
    Cursor,
    EnqueueOutcome,
    LimiterRecord,
    OwedPublish,
    ProgressEvent,
    Purge,
    QueuePause,
    ScheduleFire,
    ScheduleRecord,
    ScheduleSpec,
    SetAside,
    Stats,
    StatusCounts,
    StreamEvent,
    TaskEvent,
    TaskFilter,
    TaskRecord,
    TaskStatus,
    TaskTypeRecord,
    Throughput,
    Unclaimed,
    WorkerRecord,
    claim_from_row,
)
from taskq.ratelimits import CLAIM_AHEAD_SECONDS, HOLD_SECONDS, MAX_LIMITERS, RateLimit, own_limiter

log = logging.getLogger("taskq.store")

# pg_advisory_xact_lock key of the registry's writers: "types" in ASCII.
TYPES_LOCK_KEY = 0x7479706573
# Serialises the writers of schedules for the check against TASKQ_MAX_SCHEDULES: "sched".
SCHEDULES_LOCK_KEY = 0x7363686564
# Rounds of looking up the holders of unique keys, and inserting again those whose
# holder let go meanwhile, before a task that finds none is taken as refused for its type.
UNIQUE_ROUNDS = 5

# ... and of rate limiters, for the check against MAX_LIMITERS: "limit".
LIMITERS_LOCK_KEY = 0x6C696D6974
# Task ids per NOTIFY: a payload holds at most 8000 bytes, an id and its comma 37.
NOTIFY_IDS = 200
# Tasks a resume releases per transaction.
RELEASE_BATCH = 1000
# Statements a release of free slots runs at most, and the pause before each retry (s).
PROMOTE_TRIES = 5
PROMOTE_PAUSE = 0.005
# What a database going away raises. InternalClientError too: a connection the
# server dropped mid-statement can fail the next one with "cannot switch to
# state ...; another operation is in progress" (seen with Postgres restarting
# under load); the pool terminates that connection when it comes back.
_DOWN = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    TimeoutError,
)
# The same, for taskq.fleet.leader's lock sessions, which run their statements here too.
DATABASE_DOWN = _DOWN
# SQLSTATE classes of errors that the same statement with the same data meets
# again on every try, whatever the server's state: cardinality violations (21),
# data exceptions (22: a value jsonb or a column cannot hold, a NUL, an overflow),
# integrity constraints (23), WITH CHECK OPTION (44) and program limits (54: a
# value or row too large). Retrying them cannot help; everything else (a lost
# connection, a deadlock, a cancelled statement, a full disk) may pass.
_REFUSED_CLASSES = frozenset({"21", "22", "23", "44", "54"})


@dataclass(frozen=True, slots=True)
class NewTask:
    """One validated enqueue request; ``None`` fields take the task type's default."""

    id: uuid.UUID
    type: str
    payload_json: str
    queue: str | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None
    timeout: float | None = None
    run_at: datetime | None = None
    delay: float | None = None
    traceparent: str | None = None
    # None: not unique. One field, not four: every enqueue builds a NewTask.
    unique: UniqueKey | None = None


@dataclass(frozen=True, slots=True)
class UniqueKey:
    """What a unique task's row says of its key (taskq.unique): the key it holds
    (``<type>/<key>``), the states that hold it (``while``), how long at most (seconds),
    and whether a duplicate replaces the holder's payload and run_at (debounce)."""

    key: str
    while_: str
    for_seconds: float | None
    replace: bool


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the worker list (``workers``) shows about one worker process."""

    id: str
    hostname: str
    pid: int
    queues: Sequence[str]
    concurrency: int
    prefetch: int
    heartbeat_seconds: float


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What the store did with one :class:`NewTask` (see :class:`EnqueueOutcome`).

    ``answer`` is the enqueue's answer (:data:`ANSWER_FIELDS`, the body
    ``POST /enqueue`` returns) for created and replayed tasks, and the existing
    task's for a conflict; ``delay`` is the time left until the task is due and
    ``generation`` the row's publish generation, and ``traceparent`` the enqueuer's
    trace context, all for the publish.
    """

    outcome: EnqueueOutcome
    answer: dict[str, Any] | None = None
    delay: float = 0.0
    generation: int = 0
    traceparent: str | None = None
    republish: bool = False

    @property
    def owes_publish(self) -> bool:
        """Whether a publish is owed for it: a created task, or a replaced one whose run_at
        moved earlier than its envelope's."""
        return self.outcome is _CREATED or self.republish

    @property
    def task_id(self) -> uuid.UUID:
        """The id of the task that answers (created, replayed or in conflict)."""
        assert self.answer is not None
        task_id: uuid.UUID = self.answer["id"]
        return task_id

    def owed(self) -> OwedPublish:
        """The publish a created task is owed."""
        answer = self.answer
        assert answer is not None
        return OwedPublish.created(
            answer["id"], answer["type"], answer["queue"], self.generation, self.delay,
            self.traceparent,
        )  # fmt: skip


class _Rollback(Exception):
    def __init__(self, results: list[Enqueued]) -> None:
        self.results = results


class Store:
    """A pool of connections to the taskq database.

    Args:
        pool: the connections.
        schema: the schema of taskq's objects (``TASKQ_DB_SCHEMA``); every
            statement names them in it, whatever a connection's ``search_path``.

    Raises:
        ValueError: if ``schema`` cannot name a schema (see :func:`taskq.sql.check_schema`).
    """

    def __init__(self, pool: asyncpg.Pool, schema: str = sql.DEFAULT_SCHEMA) -> None:
        self.pool = pool
        sql.check_schema(schema)
        self.schema = schema
        self.q = sql.queries(schema)
        self.notify_channel = notify_channel(schema)
        self.finished_channel = finished_channel(schema)
        self.queues_channel = queues_channel(schema)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        session_reset: bool = True,
        schema: str = sql.DEFAULT_SCHEMA,
    ) -> Store:
        """Open a pool. Raises :class:`StoreError` if the database cannot be reached.

        With ``session_reset=False`` a connection going back to the pool is only
        rolled back if a transaction is open, instead of also running asyncpg's
        reset query (unlock all, close all, unlisten, reset all): one round trip
        less per statement, for callers that never leave session state behind.
        """
        sql.check_schema(schema)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=10,
                timeout=5,
                **({} if session_reset else {"reset": _keep_session}),
            )
        except _DOWN as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc
        return cls(pool, schema)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def _connection(
        self, connection: asyncpg.Connection | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """The caller's connection if given, else one from the pool; errors wrapped."""
        try:
            if connection is not None:
                yield connection
            else:
                async with self.pool.acquire() as acquired:
                    yield acquired
        except StoreError:
            raise
        except _DOWN as exc:
            if refused(exc):
                raise RejectedByDatabase(f"the database refused the data: {exc}") from exc
            raise StoreError(f"database error: {exc}") from exc

    # The generic helpers stay private: every statement used elsewhere has a
    # method of its own below, with named arguments and typed records.

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as connection:
            return list(await connection.fetch(self.q[query], *args))

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as connection:
            return await connection.fetchrow(self.q[query], *args)

    async def _fetchval(self, query: str, *args: Any) -> Any:
        async with self._connection() as connection:
            return await connection.fetchval(self.q[query], *args)

    async def _execute(self, query: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it affected."""
        async with self._connection() as connection:
            status: str = await connection.execute(self.q[query], *args)
        return int(status.split()[-1])

    async def _as_operator(
        self, action: str, actor: str, reason: str | None, query: str, *args: Any
    ) -> list[asyncpg.Record]:
        """Run ``query`` in a transaction whose events record who did what and why."""
        async with self._connection() as connection, connection.transaction():
            await connection.execute(self.q["admin_context"], action, actor, reason)
            return list(await connection.fetch(self.q[query], *args))

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")

    # ---------------------------------------------------------------- task types

    async def task_types(self) -> list[TaskTypeRecord]:
        return [TaskTypeRecord.from_row(row) for row in await self._fetch("types_all")]

    async def put_task_type(
        self,
        name: str,
        *,
        queue: str,
        max_attempts: int,
        timeout_seconds: float,
        backoff_json: str | None,
        payload_schema_json: str | None,
        enabled: bool,
        unique_json: str | None = None,
        max_types: int | None = None,
        concurrency: Concurrency | None = None,
        rate_limit: tuple[RateLimit | str | None] | None = None,
    ) -> tuple[TaskTypeRecord, bool]:
        """Create or replace one task type; returns it, and whether it is new. Its
        pause is kept. A changed concurrency limit releases the tasks waiting for
        slots it frees. Its rate limit changes when ``rate_limit`` is given (a
        1-tuple: see :meth:`set_type_rate_limits`), in the same transaction.

        Raises:
            TooManyTaskTypes: it is new and the registry holds ``max_types`` already.
            UnknownLimiter: ``rate_limit`` names a limiter that does not exist.
        """
        async with self._connection() as connection, connection.transaction():
            await self._check_room(connection, [name], max_types)
            before = await connection.fetchrow(self.q["type_concurrency"], name)
            row = await connection.fetchrow(
                self.q["type_put"],
                name,
                queue,
                max_attempts,
                timeout_seconds,
                backoff_json,
                payload_schema_json,
                enabled,
                unique_json,
                None if concurrency is None else concurrency.limit,
                None if concurrency is None else concurrency.key,
            )
            assert row is not None
            record = TaskTypeRecord.from_row(row)
            if rate_limit is not None:
                (limit,) = rate_limit
                await self._set_rate_limits(connection, [(name, limit)], "api")
                record = dataclasses.replace(
                    record,
                    limiter=own_limiter(name) if isinstance(limit, RateLimit) else limit,
                    limiter_source=None if limit is None else "api",
                    rate_limit=(
                        orjson.dumps(limit.to_json()).decode()
                        if isinstance(limit, RateLimit)
                        else None
                    ),
                )
        if before is not None and (before["concurrency_limit"], before["concurrency_key"]) != (
            row["concurrency_limit"],
            row["concurrency_key"],
        ):
            await self.promote_type(name)
        return record, row["created"]

    async def register_task_types(
        self,
        types: Sequence[
            tuple[str, str, int, float, str | None]
            | tuple[str, str, int, float, str | None, str | None]
            | tuple[str, str, int, float, str | None, str | None, str | None]
            | tuple[str, str, int, float, str | None, str | None, str | None, Concurrency | None]
        ],
        max_types: int | None = None,
    ) -> None:
        """Upsert ``(name, queue, max_attempts, timeout, backoff_json[, payload_schema_json[,
        unique_json[, concurrency]]])`` for a worker's handlers (a schema replaces only a
        worker's or none: see ``types_register``; without one, a worker's schema is removed;
        without a unique, the type's is removed; a concurrency limit replaces one set by
        code, not one set through the API).

        Raises:
            TooManyTaskTypes: the new ones would take the registry past ``max_types``.
        """
        rows = [(*t, None, None, None)[:8] for t in types]
        limits = [None if r[7] is None else r[7].limit for r in rows]
        keys = [None if r[7] is None else r[7].key for r in rows]
        async with self._connection() as connection, connection.transaction():
            await self._check_room(connection, [t[0] for t in types], max_types)
            columns = [list(column) for column in zip(*(r[:7] for r in rows), strict=True)]
            changed = await connection.fetch(self.q["types_register"], *columns, limits, keys)
        for row in changed:
            await self.promote_type(row["name"])

    async def set_type_rate_limits(
        self, items: Sequence[tuple[str, RateLimit | str | None]], source: str
    ) -> None:
        """Give types ``(name, limit)`` their rate limit: one of their own, the limiter
        named, or none; ``source`` says who sets it (``code`` or ``api``). With source
        ``code``, ``None`` removes only a limit the code set (an operator's stays).
        The own limiters no longer used are deleted.

        Raises:
            UnknownLimiter: a named limiter does not exist.
        """
        async with self._connection() as connection, connection.transaction():
            await self._set_rate_limits(connection, items, source)

    async def _set_rate_limits(
        self,
        connection: asyncpg.Connection,
        items: Sequence[tuple[str, RateLimit | str | None]],
        source: str,
    ) -> None:
        names = sorted({name for name, _ in items})
        current = {
            row["name"]: row["limiter_source"]
            for row in await connection.fetch(self.q["type_limiters"], names)
        }
        for name, spec in sorted(items, key=lambda item: item[0]):
            if spec is None and source == "code" and current.get(name) != "code":
                continue
            limiter = spec if isinstance(spec, str) else None
            if isinstance(spec, RateLimit):
                limiter = own_limiter(name)
                await connection.execute(
                    self.q["limiter_put"], limiter, spec.limit, spec.per, spec.burst,
                    spec.key, name,
                )  # fmt: skip
            try:
                await connection.execute(
                    self.q["type_limiter_set"], name, limiter,
                    None if limiter is None else source,
                )  # fmt: skip
            except asyncpg.ForeignKeyViolationError:
                raise UnknownLimiter(str(spec)) from None
        await connection.execute(self.q["type_limiters_prune"], names)

    async def put_limiter(self, name: str, limit: RateLimit) -> bool:
        """Create or replace an operator's rate limiter; returns whether it is new.

        Raises:
            TooManyLimiters: it is new and there are MAX_LIMITERS already.
        """
        async with self._connection() as connection, connection.transaction():
            await connection.execute(self.q["types_lock"], LIMITERS_LOCK_KEY)
            known = await connection.fetch(self.q["limiters_list"], name)
            if not known and await connection.fetchval(self.q["limiters_count"]) >= MAX_LIMITERS:
                raise TooManyLimiters(MAX_LIMITERS)
            await connection.execute(
                self.q["limiter_put"], name, limit.limit, limit.per, limit.burst, limit.key, None
            )
        return not known

    async def limiters(self, name: str | None = None) -> list[LimiterRecord]:
        """Every rate limiter in name order, or the one named."""
        return [LimiterRecord.from_row(row) for row in await self._fetch("limiters_list", name)]

    async def delete_limiter(self, name: str) -> bool:
        """Delete an operator's rate limiter (and its buckets); False if there is none.

        Raises:
            LimiterInUse: task types name it (or it is a type's own).
        """
        async with self._connection() as connection, connection.transaction():
            row = await connection.fetchrow(self.q["limiter_lock"], name)
            if row is None:
                return False
            if row["type_name"] is not None or row["types"]:
                raise LimiterInUse(name, list(row["types"]) or [row["type_name"]])
            await connection.execute(self.q["limiter_delete"], name)
        return True

    async def prune_rate_buckets(self, idle: float, batch: int = 1000) -> int:
        """Delete up to ``batch`` rate limit buckets idle for ``idle`` seconds; returns
        how many."""
        return await self._execute("rate_buckets_prune", idle, batch)

    async def _check_room(
        self, connection: asyncpg.Connection, names: list[str], max_types: int | None
    ) -> None:
        """Raise TooManyTaskTypes if ``names`` would take the registry past ``max_types``."""
        if max_types is None:
            return
        await connection.execute(self.q["types_lock"], TYPES_LOCK_KEY)
        if await connection.fetchval(self.q["types_count_with"], names) > max_types:
            rows = await connection.fetch(self.q["types_all"])
            known = {row["name"] for row in rows}
            raise TooManyTaskTypes(max_types, [n for n in names if n not in known])

    # ---------------------------------------------------------------- waiting
    # WAITING tasks are released in the transaction that frees them, with the relay
    # woken for them at its commit (as an enqueue in a caller's transaction wakes it).

    async def pause_type(self, name: str, paused: bool) -> TaskTypeRecord | None:
        """Pause or resume a type (None: no such type). Resuming releases its parked
        tasks, in batches of :data:`RELEASE_BATCH`, once the resume has committed."""
        row = await self._fetchrow("type_pause", name, paused)
        if row is None:
            return None
        if not paused:
            await self.release_paused(name)
        return TaskTypeRecord.from_row(row)

    async def release_paused(self, name: str, batches: int | None = None) -> int:
        """Release the tasks a pause of ``name`` parked, if it is not paused (any more),
        in transactions of :data:`RELEASE_BATCH` each, at most ``batches`` of them
        (None: until none is left); returns how many."""
        released = 0
        while batches is None or batches > 0:
            async with self._connection() as connection, connection.transaction():
                rows = await connection.fetch(self.q["type_release_paused"], name, RELEASE_BATCH)
                await self._notify([r["id"] for r in rows], _Asyncpg(connection, self.q))
            released += len(rows)
            if len(rows) < RELEASE_BATCH:
                break
            batches = None if batches is None else batches - 1
        return released

    async def promote_type(self, name: str, keys: Sequence[str] | None = None) -> int:
        """Release the tasks of ``name`` waiting for concurrency slots that are free
        (after its limit changed, or a release missed them), of ``keys`` or of all
        its keys; returns how many."""
        async with self._connection() as connection, connection.transaction():
            slots = await connection.fetch(
                self.q["slots_lock"], name, None if keys is None else list(keys)
            )
            return await self._promote(connection, slots)

    async def waiting_any(self) -> bool:
        """Whether any task is WAITING (an index-only probe)."""
        return bool(await self._fetchval("waiting_any"))

    async def waiting_keys(self, after: tuple[str, str], limit: int) -> list[tuple[str, str, bool]]:
        """The next ``limit`` (type, key) pairs after ``after`` with tasks WAITING for a
        concurrency slot, in order, each with whether it has room now (fewer running
        than its limit, counting the tasks released and due)."""
        rows = await self._fetch("waiting_keys", after[0], after[1], limit)
        return [(row["type"], row["key"], row["room"]) for row in rows]

    async def waiting_resumed_types(self) -> list[str]:
        """The types not paused that still have tasks a pause parked."""
        return [row["name"] for row in await self._fetch("waiting_resumed_types")]

    async def concurrency_keys(self, name: str, limit: int) -> list[ConcurrencyKey]:
        """The busiest concurrency keys of a type, with their running and waiting tasks."""
        return [
            ConcurrencyKey.from_row(row) for row in await self._fetch("slots_list", name, limit)
        ]

    async def _release_slots(
        self, connection: asyncpg.Connection, ids: Sequence[uuid.UUID]
    ) -> None:
        """Give back the concurrency slots of the attempts ``ids`` that just ended, and
        release the tasks waiting for them, in the caller's transaction."""
        freed = await connection.fetch(self.q["slots_release"], list(ids))
        if freed:
            await self._promote(connection, freed)

    async def _promote(
        self, connection: asyncpg.Connection, slots: Sequence[Mapping[str, Any]]
    ) -> int:
        """Release the oldest tasks waiting for the free slots of ``slots`` (locked by this
        transaction already): statements of their own, so they see what claims parked
        before the slots were locked. A key that released fewer than it had free while
        tasks still wait is tried again (see ``slots_promote``), a few times."""
        keys = [(s["type"], s["key"]) for s in slots]
        released: list[uuid.UUID] = []
        for attempt in range(PROMOTE_TRIES):
            if not keys:
                break
            if attempt:
                await asyncio.sleep(PROMOTE_PAUSE * attempt)
            rows = await connection.fetch(
                self.q["slots_promote"], [k[0] for k in keys], [k[1] for k in keys]
            )
            for row in rows:
                released += row["ids"]
            keys = [
                (row["type"], row["key"])
                for row in rows
                if row["more"] and len(row["ids"]) < row["free"]
            ]
        if keys:
            log.warning("tasks wait for free concurrency slots of %s: their rows were held", keys)
        await self._notify(released, _Asyncpg(connection, self.q))
        return len(released)

    async def _ending(
        self, query: str, columns: Sequence[Any], holds_slots: bool
    ) -> list[asyncpg.Record]:
        """Run an outcome statement; when some of its attempts hold concurrency slots,
        in a transaction that gives them back (see :meth:`_release_slots`)."""
        if not holds_slots:
            return await self._fetch(query, *columns)
        async with self._connection() as connection, connection.transaction():
            rows = list(await connection.fetch(self.q[query], *columns))
            await self._release_slots(connection, [row[0] for row in rows])
            return rows

    # ---------------------------------------------------------------- enqueue

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

    async def notify_owed(self, ids: Sequence[uuid.UUID]) -> None:
        """Wake the active relay to publish the owed rows ``ids`` now, not after its grace."""
        async with self._connection() as conn:
            await self._notify(ids, _Asyncpg(conn, self.q))

    async def _notify(self, ids: Sequence[uuid.UUID], conn: _Statements) -> None:
        """Name ``ids`` to the relay (see ``enqueue_notify`` SQL), NOTIFY_IDS a payload."""
        for start in range(0, len(ids), NOTIFY_IDS):
            payload = ",".join(str(task_id) for task_id in ids[start : start + NOTIFY_IDS])
            await conn.execute("enqueue_notify", self.notify_channel, payload)

    async def mark_published(self, published: Sequence[tuple[uuid.UUID, int]]) -> None:
        """Record confirmed publishes of ``(id, generation)``.

        A row whose generation moved on since (a newer publish is owed) is left owed.
        """
        if not published:
            return
        async with self._connection() as conn:
            await conn.execute(self.q["mark_published"], *_columns(sorted(published), 2))

    async def set_aside(
        self, items: Sequence[tuple[uuid.UUID, int, str]], retry_min: float, retry_max: float
    ) -> list[SetAside]:
        """Set owed publishes ``(id, generation, reason)`` aside (see ``set_aside`` SQL);
        returns those set aside."""
        columns = _columns(sorted(items), 3)
        rows = await self._fetch("set_aside", *columns, retry_min, retry_max)
        return [SetAside.from_row(row) for row in rows]

    async def publish_owed(self, grace: float, limit: int) -> list[OwedPublish]:
        """Up to ``limit`` owed publishes older than ``grace`` seconds, oldest first."""
        return _owed(await self._fetch("publish_owed", grace, limit))

    async def owed_among(self, ids: Sequence[uuid.UUID]) -> list[OwedPublish]:
        """The owed publishes (not set aside) among the tasks ``ids``."""
        return _owed(await self._fetch("publish_owed_ids", list(ids)))

    async def set_aside_due(self, limit: int) -> list[OwedPublish]:
        """Up to ``limit`` set-aside publishes whose retry is due, the earliest first."""
        return _owed(await self._fetch("publish_set_aside_due", limit))

    # ---------------------------------------------------------------- reading

    async def task(self, task_id: uuid.UUID) -> TaskRecord | None:
        row = await self._fetchrow("task_get", task_id)
        return None if row is None else TaskRecord.from_detail_row(row)

    async def request_wait(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Mark tasks as waited for (their end sends a NOTIFY on :attr:`finished_channel`).

        Returns the ids marked: those still ENQUEUED or RUNNING. The others have
        ended or do not exist; read them.
        """
        return {row["id"] for row in await self._fetch("wait_request", list(ids))}

    async def task_events(self, task_id: uuid.UUID) -> list[TaskEvent]:
        return [TaskEvent.from_row(row) for row in await self._fetch("task_events", task_id)]

    async def unpublished_count(self) -> int:
        async with self._connection() as conn:
            count: int = await conn.fetchval(self.q["unpublished_count"])
            return count

    # ---------------------------------------------------------------- worker
    # Every method takes a whole batch and runs one statement. Outcome batches
    # are sorted by id so that concurrent statements of one worker (outcomes,
    # heartbeat) lock rows in the same order and cannot deadlock. Heartbeats
    # and outcomes name each claim by (id, claim token) and change nothing for
    # a claim that has been taken over: its token is gone from the row.

    async def claim(
        self, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> list[ClaimedTask | Unclaimed]:
        """Claim deliveries: one record per distinct id, claimed or not and why
        (see ``claim`` SQL)."""
        async with self._connection() as connection:
            return await self._claim_on(connection, ids, worker_id, lease)

    @asynccontextmanager
    async def claim_open(
        self, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> AsyncIterator[OpenClaim]:
        """Claim deliveries as :meth:`claim` does, in a transaction that stays open
        until the ``async with`` block ends: it commits then, or rolls back (the
        claim never happened) if the block raises. See :class:`OpenClaim`."""
        async with self._connection() as connection, connection.transaction():
            claims = await self._claim_on(connection, ids, worker_id, lease)
            yield OpenClaim(self, connection, claims)

    async def _claim_on(
        self, connection: asyncpg.Connection, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> list[ClaimedTask | Unclaimed]:
        """The ``claim`` statement, then ``claim_gated`` for the rows of gated types
        it left (none unless a type is paused or limited): two statements for those,
        so that the one every batch runs stays small enough for a generic plan."""
        rows = await connection.fetch(self.q["claim"], sorted(ids), worker_id, lease)
        gated = sorted(row["id"] for row in rows if row["decision"] == "gated")
        if gated:
            rows = [row for row in rows if row["decision"] != "gated"]
            rows += await connection.fetch(
                self.q["claim_gated"], gated, worker_id, lease, HOLD_SECONDS, CLAIM_AHEAD_SECONDS
            )
        return [claim_from_row(row) for row in rows]

    async def heartbeat(
        self, claims: Sequence[tuple[uuid.UUID, uuid.UUID]], worker: WorkerInfo, lease: float
    ) -> dict[uuid.UUID, bool]:
        """Record the worker alive and extend the leases of its claims ``(id, token)``.

        Returns the tokens of the claims it still holds, each mapped to whether
        an operator asked to cancel the task.
        """
        ids, tokens = _columns(sorted(claims), 2)
        rows = await self._fetch(
            "heartbeat",
            ids,
            worker.id,
            lease,
            worker.hostname,
            worker.pid,
            list(worker.queues),
            worker.concurrency,
            worker.prefetch,
            worker.heartbeat_seconds,
            tokens,
        )
        return {row["claim_token"]: row["cancel_requested"] for row in rows}

    async def write_progress(
        self, items: Sequence[tuple[uuid.UUID, int, float, str | None]]
    ) -> None:
        """Record the latest progress of tasks ``(id, attempt, fraction, details_json)``,
        each id once."""
        await self._execute("progress_write", *_columns(sorted(items), 4))

    async def worker_gone(self, worker_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(self.q["worker_gone"], worker_id)

    # Outcomes: each returns the tasks recorded, by their new status (CANCELLED if a
    # cancel was requested meanwhile); an id missing from the answer was not held by
    # that claim any more (stale). Those but complete return the publish each owes
    # (none for a CANCELLED one).

    # ``holds_slots``: some of the attempts hold a concurrency slot (their claim said
    # so); the statement then runs in a transaction that gives the slots back.

    async def complete(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str]], *, holds_slots: bool = False
    ) -> dict[uuid.UUID, TaskStatus]:
        """Record successes ``(id, token, result_json)``."""
        async with self._connection() as connection:
            if not holds_slots:
                return await self._complete(connection, items)
            async with connection.transaction():
                return await self._complete(connection, items, holds_slots=True)

    async def _complete(
        self,
        connection: asyncpg.Connection,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        rows = await connection.fetch(self.q["complete"], *_columns(sorted(items), 3))
        if holds_slots:
            await self._release_slots(connection, [row[0] for row in rows])
        return {row[0]: STATUS_BY_TEXT[row[1]] for row in rows}

    async def cancel_running(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID]], *, holds_slots: bool = False
    ) -> list[OwedPublish]:
        """Record claims ``(id, token)`` stopped on an operator's cancel request."""
        return _owed(await self._ending("cancel_running", _columns(sorted(items), 2), holds_slots))

    async def retry(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str, float]], *, holds_slots: bool = False
    ) -> list[OwedPublish]:
        """Record retryable failures ``(id, token, error, delay)``."""
        return _owed(await self._ending("retry", _columns(sorted(items), 4), holds_slots))

    async def fail(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str]], *, holds_slots: bool = False
    ) -> list[OwedPublish]:
        """Record terminal failures ``(id, token, error)``."""
        return _owed(await self._ending("fail", _columns(sorted(items), 3), holds_slots))

    async def give_back(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID]], *, holds_slots: bool = False
    ) -> list[OwedPublish]:
        """Give back unfinished claims ``(id, token)`` at shutdown; the attempt does not count."""
        return _owed(await self._ending("give_back", _columns(sorted(items), 2), holds_slots))

    async def recover_expired(self, limit: int) -> list[OwedPublish]:
        """Take back up to ``limit`` claims whose lease expired; returns them with the
        publish each owes (ENQUEUED, FAILED, or CANCELLED: nothing owed). Their
        concurrency slots are given back in the same transaction."""
        return _owed(await self._ending("recover_expired", [limit], True))

    async def overdue_enqueued(self, queue: str, seconds: float, limit: int) -> list[uuid.UUID]:
        """ENQUEUED tasks of ``queue`` published and due more than ``seconds`` ago."""
        rows = await self._fetch("overdue_enqueued", queue, seconds, limit)
        return [row["id"] for row in rows]

    async def republish(self, ids: Sequence[uuid.UUID]) -> int:
        """Mark ENQUEUED tasks' publishes owed again, for the relay to pay at once."""
        async with self._connection() as conn:
            status: str = await conn.execute(self.q["republish"], list(ids))
        return int(status.split()[-1])

    # ---------------------------------------------------------------- sweeper

    async def unfinished_purges(self, older_than: float) -> list[Purge]:
        """Queue purges begun more than ``older_than`` seconds ago and never ended."""
        rows = await self._fetch("purges_unfinished", older_than)
        return [Purge.from_row(row) for row in rows]

    async def begin_purge(self, queue: str) -> int:
        """Record a broker purge of ``queue`` about to start; returns its id."""
        purge_id: int = await self._fetchval("purge_begin", queue)
        return purge_id

    async def end_purge(self, purge_id: int) -> None:
        await self._execute("purge_end", purge_id)

    async def republish_queue(self, queue: str) -> int:
        """Owe again the publishes of ``queue``'s due ENQUEUED tasks; returns how many."""
        return await self._execute("republish_queue", queue)

    async def prune_workers(self, silent_for: float) -> None:
        """Forget workers silent for longer than ``silent_for`` seconds."""
        await self._execute("workers_prune", silent_for)

    async def delete_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` tasks finished more than ``older_than`` seconds ago, and
        their events; returns how many."""
        deleted: int = await self._fetchval("retention_delete", older_than, limit)
        return deleted

    # ---------------------------------------------------------------- schedules

    async def put_schedule(
        self, spec: ScheduleSpec, next_fire_at: datetime, *, max_schedules: int
    ) -> ScheduleRecord:
        """Create or replace a schedule; a replacement with the same timing keeps its
        next fire (``created`` on the record says which it was).

        Raises:
            TooManySchedules: a new schedule would pass ``max_schedules``.
        """
        async with self._connection() as connection, connection.transaction():
            # The advisory lock of types_lock, under a key of its own.
            await connection.execute(self.q["types_lock"], SCHEDULES_LOCK_KEY)
            if await connection.fetchval(self.q["schedules_count_with"], spec.name) > max_schedules:
                raise TooManySchedules(max_schedules)
            row = await connection.fetchrow(
                self.q["schedule_put"], spec.name, spec.cron, spec.timezone, spec.every_seconds,
                spec.type, spec.payload, spec.queue, spec.catch_up, spec.catch_up_limit,
                spec.overlap, spec.source, next_fire_at,
            )  # fmt: skip
        assert row is not None  # an upsert returns its row
        return ScheduleRecord.from_row(row)

    async def schedule(self, name: str) -> ScheduleRecord | None:
        row = await self._fetchrow("schedule_get", name)
        return None if row is None else ScheduleRecord.from_row(row)

    async def schedules(self, after: str, limit: int) -> list[ScheduleRecord]:
        """Schedules in name order, after the name ``after`` ("" for the first page)."""
        rows = await self._fetch("schedules_list", after, limit)
        return [ScheduleRecord.from_row(r) for r in rows]

    async def count_schedules(self) -> int:
        count: int = await self._fetchval("schedules_count")
        return count

    async def delete_code_schedules(self, types: Sequence[str], keep: Sequence[str]) -> list[str]:
        """Delete the schedules declared in code (``source`` code) for ``types`` whose
        names are not in ``keep``; returns their names."""
        rows = await self._fetch("schedules_delete_code", list(types), list(keep))
        return [row["name"] for row in rows]

    async def delete_schedule(self, name: str) -> bool:
        return await self._execute("schedule_delete", name) > 0

    async def pause_schedule(
        self, name: str, *, paused: bool, next_fire_at: datetime | None = None
    ) -> ScheduleRecord | None:
        """Pause or resume; resuming moves the next fire to ``next_fire_at``."""
        row = await self._fetchrow("schedule_pause", name, paused, next_fire_at)
        return None if row is None else ScheduleRecord.from_row(row)

    async def database_now(self) -> datetime:
        """The database's clock, the one schedules' fires are compared with."""
        now: datetime = await self._fetchval("db_now")
        return now

    async def due_schedules(self, limit: int) -> tuple[datetime, list[ScheduleRecord]]:
        """The database's clock, and the schedules due by it (at most ``limit``)."""
        rows = await self._fetch("schedules_due", limit)
        if not rows:
            return await self.database_now(), []
        return rows[0]["now"], [ScheduleRecord.from_row(r) for r in rows]

    async def seconds_to_next_fire(self) -> float | None:
        """Seconds until the next fire of a schedule that is not paused (None: none)."""
        seconds: float | None = await self._fetchval("schedules_next")
        return seconds

    async def fire_schedule(self, fire: ScheduleFire) -> list[OwedPublish]:
        """Enqueue a schedule's fires and move it on, if its next fire is still
        ``fire.expected_next_fire_at``; returns the tasks created, owed their publish."""
        return _owed(
            await self._fetch(
                "schedule_fire", fire.name, fire.expected_next_fire_at, fire.manual, fire.ids,
                fire.idempotency_keys, fire.next_fire_at, fire.last_fire_at, fire.skipped,
                fire.fingerprint,
            )
        )  # fmt: skip

    # ---------------------------------------------------------------- monitoring

    async def stats(self, window_seconds: float) -> Stats:
        """Counts by status, queue and type; scheduled tasks; the recent window's
        throughput; waiting tasks by type and reason; the paused types."""
        counts = await self._fetch("stats_counts")
        window = await self._fetchrow("stats_window", window_seconds)
        scheduled: int = await self._fetchval("stats_scheduled")
        waiting: dict[str, dict[str, int]] = {}
        for row in await self._fetch("stats_waiting"):
            waiting.setdefault(row["type"], {})[row["wait_reason"]] = row["n"]
        paused = [t.name for t in await self.task_types() if t.paused]
        assert window is not None
        return Stats(
            StatusCounts.from_rows(counts), scheduled, Throughput.from_row(window), waiting, paused
        )

    async def workers(self, missed_heartbeats: int) -> list[WorkerRecord]:
        """The workers registry; alive: missed fewer than ``missed_heartbeats`` heartbeats."""
        rows = await self._fetch("workers_list", missed_heartbeats)
        return [WorkerRecord.from_row(row) for row in rows]

    async def last_event_id(self) -> int:
        last: int = await self._fetchval("events_last_id")
        return last

    async def last_progress_seq(self) -> int:
        last: int = await self._fetchval("progress_last_seq")
        return last

    async def progress_since(self, after_seq: int, limit: int) -> list[ProgressEvent]:
        """Up to ``limit`` progress reports written after ``after_seq``, oldest first."""
        rows = await self._fetch("progress_since", after_seq, limit)
        return [ProgressEvent.from_row(row) for row in rows]

    async def events_since(self, after_id: int, limit: int) -> list[StreamEvent]:
        """Up to ``limit`` task events of any task after ``after_id``, oldest first."""
        rows = await self._fetch("events_since", after_id, limit)
        return [StreamEvent.from_row(row) for row in rows]

    # ---------------------------------------------------------------- admin

    async def list_tasks(
        self,
        filters: TaskFilter,
        cursor: Cursor | None,
        limit: int,
        *,
        with_payload: bool = False,
        with_result: bool = False,
    ) -> list[TaskRecord]:
        """Tasks matching ``filters``, newest first, after ``cursor`` (on created_at, id).

        Payloads and results are read only when asked for (each can be a MiB).
        """
        statuses = None if filters.statuses is None else sorted(str(s) for s in filters.statuses)
        rows = await self._fetch(
            "tasks_list",
            statuses,
            filters.type,
            filters.queue,
            filters.created_after,
            filters.created_before,
            filters.scheduled,
            *_after(cursor),
            limit,
            with_payload,
            with_result,
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def list_dead_letters(
        self,
        task_type: str | None,
        queue: str | None,
        cursor: Cursor | None,
        limit: int,
        *,
        with_payload: bool = False,
        with_result: bool = False,
    ) -> list[TaskRecord]:
        """FAILED tasks, newest finished first, after ``cursor`` (on finished_at, id)."""
        rows = await self._fetch(
            "dlq_list",
            task_type,
            queue,
            *_after(cursor),
            limit,
            with_payload,
            with_result,
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def pick_dead_letters(
        self,
        task_type: str | None,
        queue: str | None,
        ids: Sequence[uuid.UUID] | None,
        limit: int,
    ) -> list[uuid.UUID]:
        """Up to ``limit`` FAILED tasks to replay, oldest failure first; None matches all."""
        rows = await self._fetch(
            "dlq_pick", task_type, queue, None if ids is None else list(ids), limit
        )
        return [row["id"] for row in rows]

    async def cancel(
        self, task_id: uuid.UUID, *, actor: str, reason: str | None
    ) -> TaskStatus | None:
        """An operator's cancel (see ``cancel`` SQL): the task's status after it,
        CANCELLED or RUNNING (a cancel request), or None if it was neither ENQUEUED
        nor RUNNING (nothing changed)."""
        rows = await self._as_operator("cancel", actor, reason, "cancel", task_id)
        return TaskStatus(rows[0]["status"]) if rows else None

    async def requeue(
        self,
        ids: Sequence[uuid.UUID],
        statuses: Sequence[TaskStatus],
        *,
        action: str,
        actor: str,
        reason: str | None,
    ) -> list[OwedPublish]:
        """ENQUEUE the tasks ``ids`` that are in ``statuses`` again, with fresh attempts
        (an operator's retry or replay); returns them with the publish each owes."""
        rows = await self._as_operator(
            action, actor, reason, "requeue", list(ids), [str(s) for s in statuses]
        )
        return _owed(rows)

    async def cancel_enqueued(
        self, queue: str, *, limit: int, after: uuid.UUID | None, actor: str, reason: str
    ) -> list[uuid.UUID]:
        """A queue purge's step: cancel up to ``limit`` ENQUEUED tasks of ``queue`` whose
        id is above ``after``, in id order; returns their ids."""
        rows = await self._as_operator(
            "purge", actor, reason, "queue_cancel_enqueued", queue, limit, after
        )
        return [row["id"] for row in rows]

    # ---------------------------------------------------------------- queue pauses

    async def pause_queue(
        self, queue: str, *, paused_by: str, reason: str | None
    ) -> tuple[QueuePause, bool]:
        """Pause work queue ``queue``; returns its pause, and whether it is new (a queue
        paused already keeps its pause). A new pause notifies the workers."""
        for _ in range(5):
            row = await self._fetchrow("queue_pause", queue, paused_by, reason, self.queues_channel)
            if row is not None:
                return QueuePause.from_row(row), True
            # Paused already, unless a resume deleted the row since the insert met it.
            row = await self._fetchrow("queue_pause_get", queue)
            if row is not None:
                return QueuePause.from_row(row), False
        raise StoreError(f"queue {queue!r} kept being paused and resumed meanwhile; try again")

    async def resume_queue(self, queue: str) -> QueuePause | None:
        """Resume work queue ``queue``; returns the pause it ended (None: it was not
        paused). Notifies the workers if it was."""
        row = await self._fetchrow("queue_resume", queue, self.queues_channel)
        return None if row is None else QueuePause.from_row(row)

    async def queue_pauses(
        self, connection: asyncpg.Connection | None = None, timeout: float | None = None
    ) -> list[QueuePause]:
        """Every paused queue, by name; on ``connection`` (a worker's listening
        connection, which the read then also checks) if given, within ``timeout``."""
        async with self._connection(connection) as conn:
            rows = await conn.fetch(self.q["queue_pauses"], timeout=timeout)
        return [QueuePause.from_row(row) for row in rows]


_CREATED = EnqueueOutcome.CREATED

ANSWER_FIELDS = (
    "id",
    "type",
    "queue",
    "status",
    "attempts",
    "max_attempts",
    "run_at",
    "created_at",
)


class OpenClaim:
    """A claim whose transaction is still open (:meth:`Store.claim_open`): its rows are
    locked, RUNNING only for this transaction until it commits.

    Attributes:
        rows: the claim's records, as :meth:`Store.claim` returns them.
    """

    __slots__ = ("_connection", "_store", "rows")

    def __init__(
        self,
        store: Store,
        connection: asyncpg.Connection,
        rows: list[ClaimedTask | Unclaimed],
    ) -> None:
        self._store = store
        self._connection = connection
        self.rows = rows

    async def complete(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str]], *, holds_slots: bool = False
    ) -> dict[uuid.UUID, TaskStatus]:
        """Record successes ``(id, token, result_json)`` in the claim's transaction, as
        :meth:`Store.complete` does; they commit with the claim."""
        return await self._store._complete(self._connection, items, holds_slots=holds_slots)


def _answer(row: Mapping[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in ANSWER_FIELDS}


def _duplicate(row: Mapping[str, Any], replaced: bool) -> dict[str, Any]:
    """The answer to an enqueue whose unique key ``row`` holds."""
    return {**_answer(row), "duplicate": True, "replaced": replaced}


def _after(cursor: Cursor | None) -> tuple[datetime | None, uuid.UUID | None]:
    """A listing's keyset parameters: the sort time and id to go on after (None: the start)."""
    return (None, None) if cursor is None else (cursor.at, cursor.id)


def _owed(rows: Sequence[asyncpg.Record]) -> list[OwedPublish]:
    from_row = OwedPublish.from_row
    return [from_row(row) for row in rows]


def notify_channel(schema: str) -> str:
    """The channel that wakes the relay of the install in ``schema``: ``taskq_enqueued``
    for the default schema, so that each install in a database hears only its own."""
    return f"{schema}_enqueued"


def finished_channel(schema: str) -> str:
    """The channel on which tasks somebody waits for announce their end (their id is
    the payload): ``taskq_finished`` for the default schema (migration 0008's trigger)."""
    return f"{schema}_finished"


def queues_channel(schema: str) -> str:
    """The channel on which pauses and resumes of work queues wake the workers (the
    queue's name is the payload): ``taskq_queues`` for the default schema."""
    return f"{schema}_queues"


async def listen(
    url: str,
    channel: str,
    on_notify: Callable[[str], None],
    on_lost: Callable[[], None],
    *,
    name: str,
) -> asyncpg.Connection:
    """A dedicated connection that LISTENs on ``channel``: ``on_notify(payload)`` for
    each notification, ``on_lost()`` once the connection is gone.

    Raises:
        StoreError: the database cannot be reached.
    """
    try:
        connection = await asyncpg.connect(
            url, timeout=5, server_settings={"application_name": name[:63]}
        )
    except _DOWN as exc:
        raise StoreError(f"cannot connect to the database: {exc}") from exc

    def notified(conn: object, pid: int, channel: str, payload: str) -> None:
        on_notify(payload)

    try:
        connection.add_termination_listener(lambda conn: on_lost())
        await connection.add_listener(channel, notified)
    except BaseException as exc:
        connection.terminate()
        if isinstance(exc, _DOWN):
            raise StoreError(f"cannot listen for notifications: {exc}") from exc
        raise
    return connection


def refused(exc: BaseException) -> bool:
    """Whether a driver error can never succeed when tried again (see ``_REFUSED_CLASSES``).

    asyncpg raises its ``DataError`` also for an argument it cannot encode
    (an integer out of range), before anything reaches the server.
    """
    if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
        return True
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return isinstance(state, str) and state[:2] in _REFUSED_CLASSES


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A pool reset that adds nothing to asyncpg's rollback of an open transaction."""


def _columns(items: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of a batch as ``width`` column lists (the arrays an ``unnest`` statement takes)."""
    if not items:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*items, strict=True)]


# ---------------------------------------------------------------- callers' connections
# An enqueue inside a caller's transaction runs its statements on the caller's
# connection: asyncpg's ($n placeholders), or psycopg 3's (the same blocks compiled
# to %(name)s by taskq.sql.psycopg_queries). psycopg is optional: it is only looked
# at when the caller's connection is one of its (it is imported then).


class _Statements(Protocol):
    """Named blocks run on one connection, rows read by column name."""

    async def fetch(self, query: str, *args: Any) -> Sequence[Mapping[str, Any]]: ...

    async def execute(self, query: str, *args: Any) -> None: ...

    def in_transaction(self) -> bool:
        """Whether a statement run now joins an open transaction."""
        ...


class _Asyncpg:
    def __init__(self, connection: asyncpg.Connection, queries: Mapping[str, str]) -> None:
        self.connection = connection
        self.q = queries

    async def fetch(self, query: str, *args: Any) -> Sequence[Mapping[str, Any]]:
        rows: list[asyncpg.Record] = await self.connection.fetch(self.q[query], *args)
        return rows

    async def execute(self, query: str, *args: Any) -> None:
        await self.connection.execute(self.q[query], *args)

    def in_transaction(self) -> bool:
        in_transaction: bool = self.connection.is_in_transaction()
        return in_transaction


class _Psycopg:
    """A caller's psycopg connection: each statement on a cursor of taskq's own
    (server-side binding, rows as dicts), whatever cursor class the connection
    makes (Django's binds on the client); errors wrapped as :func:`_wrapped` does."""

    def __init__(self, connection: Any, schema: str) -> None:
        self.connection = connection
        self.q = sql.psycopg_queries(schema)

    async def fetch(self, query: str, *args: Any) -> Sequence[Mapping[str, Any]]:
        return await self._run(self.q[query], args)

    async def execute(self, query: str, *args: Any) -> None:
        await self._run(self.q[query], args)

    def in_transaction(self) -> bool:
        # Out of autocommit, psycopg opens a transaction before the first statement.
        import psycopg

        idle = self.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        return not (self.connection.autocommit and idle)

    async def _run(self, query: sql.NamedQuery, args: Sequence[Any]) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        params = query.bind(args)
        try:
            if isinstance(self.connection, psycopg.AsyncConnection):
                async with psycopg.AsyncCursor(self.connection, row_factory=dict_row) as cursor:
                    await cursor.execute(query.text, params)
                    return await cursor.fetchall() if cursor.description else []
            return await asyncio.to_thread(self._run_sync, query.text, params)
        except psycopg.Error as exc:
            refused_data = isinstance(exc, psycopg.DataError | psycopg.IntegrityError)
            raise _wrapped(exc, refused_data) from exc

    def _run_sync(self, text: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.Cursor(self.connection, row_factory=dict_row) as cursor:
            cursor.execute(text, params)
            return cursor.fetchall() if cursor.description else []


def _psycopg(connection: object, schema: str) -> _Psycopg | None:
    """``connection`` as a caller's psycopg connection, or None if it is none."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(connection, psycopg.Connection | psycopg.AsyncConnection):
        return _Psycopg(connection, schema)
    return None


def _wrapped(exc: Exception, refused_data: bool) -> StoreError:
    """The taskq error for a driver's ``exc``; ``refused_data``: the driver says the data
    itself was refused (psycopg's DataError and IntegrityError, raised before or by the
    server), which the same data meets again."""
    state = getattr(exc, "sqlstate", None)
    if refused_data or (isinstance(state, str) and state[:2] in _REFUSED_CLASSES):
        return RejectedByDatabase(f"the database refused the data: {exc}")
    return StoreError(f"database error: {exc}")


# ---------------------------------------------------------------- lock sessions
# The statements of taskq.fleet.leader.SessionLock, each on its dedicated connection
# and bounded by ``timeout`` seconds. asyncpg's errors are the caller's to map:
# any of them means the lock is lost.


async def lock_session_limits(
    connection: asyncpg.Connection, settings: Sequence[str], timeout: float
) -> set[str]:
    """Bound the session on the server's side (see ``session_limits`` SQL); returns
    the names of the settings this server knows and took."""
    rows = await connection.fetch(sql.queries()["session_limits"], *settings, timeout=timeout)
    return {row["name"] for row in rows}


async def try_session_lock(connection: asyncpg.Connection, key: int, timeout: float) -> bool:
    """Take the advisory lock ``key`` for the session if it is free."""
    taken: bool = await connection.fetchval(sql.queries()["session_lock"], key, timeout=timeout)
    return taken


async def session_alive(connection: asyncpg.Connection, timeout: float) -> None:
    """A round trip on the session: raises if it (and with it its locks) is gone."""
    await connection.fetchval(sql.queries()["session_alive"], timeout=timeout)
