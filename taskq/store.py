"""The only module that runs SQL: every statement comes from ``sql/queries.sql``.

asyncpg errors stay inside; callers see :class:`~taskq.errors.StoreError`
(but for the lock-session statements, whose every error means a lost lock to
:mod:`taskq.leader`). Methods that take lists run one statement for the whole batch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

import taskq.sql as sql
from taskq.errors import RejectedByDatabase, StoreError, TooManyTaskTypes

log = logging.getLogger("taskq.store")

# pg_advisory_xact_lock key of the registry's writers: "types" in ASCII.
TYPES_LOCK_KEY = 0x7479706573
# Task ids per NOTIFY: a payload holds at most 8000 bytes, an id and its comma 37.
NOTIFY_IDS = 200
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
# The same, for taskq.leader's lock sessions, which run their statements here too.
DATABASE_DOWN = _DOWN
# SQLSTATE classes of errors that the same statement with the same data meets
# again on every try, whatever the server's state: cardinality violations (21),
# data exceptions (22: a value jsonb or a column cannot hold, a NUL, an overflow),
# integrity constraints (23), WITH CHECK OPTION (44) and program limits (54: a
# value or row too large). Retrying them cannot help; everything else (a lost
# connection, a deadlock, a cancelled statement, a full disk) may pass.
_REFUSED_CLASSES = frozenset({"21", "22", "23", "44", "54"})

# asyncpg.Record: read by column name.
Row: TypeAlias = Mapping[str, Any]


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
    """What the store did with one :class:`NewTask`.

    ``outcome`` is ``created``, ``replayed`` (the key exists with the same
    request), ``conflict`` (the key exists with another request) or
    ``unknown_type`` (the type is not registered or is disabled). ``row`` holds
    the answer's fields for created and replayed tasks; ``delay`` is the time
    left until the task is due and ``generation`` the row's publish generation,
    both for the publish.
    """

    outcome: str
    row: dict[str, Any] | None = None
    delay: float = 0.0
    generation: int = 0


_REFUSED = ("conflict", "unknown_type")


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

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self._connection() as connection:
            return list(await connection.fetch(self.q[query], *args))

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._connection() as connection:
            row: Row | None = await connection.fetchrow(self.q[query], *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self._connection() as connection:
            return await connection.fetchval(self.q[query], *args)

    async def execute(self, query: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it affected."""
        async with self._connection() as connection:
            status: str = await connection.execute(self.q[query], *args)
        return int(status.split()[-1])

    async def as_operator(
        self, action: str, actor: str, reason: str | None, query: str, *args: Any
    ) -> list[Row]:
        """Run ``query`` in a transaction whose events record who did what and why."""
        async with self._connection() as connection, connection.transaction():
            await connection.execute(self.q["admin_context"], action, actor, reason)
            return list(await connection.fetch(self.q[query], *args))

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")

    # ---------------------------------------------------------------- task types

    async def task_types(self) -> list[Row]:
        return await self.fetch("types_all")

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
        max_types: int | None = None,
    ) -> Row:
        """Create or replace one task type.

        Raises:
            TooManyTaskTypes: it is new and the registry holds ``max_types`` already.
        """
        async with self._connection() as connection, connection.transaction():
            await self._check_room(connection, [name], max_types)
            row: Row | None = await connection.fetchrow(
                self.q["type_put"],
                name,
                queue,
                max_attempts,
                timeout_seconds,
                backoff_json,
                payload_schema_json,
                enabled,
            )
        assert row is not None
        return row

    async def register_task_types(
        self, types: Sequence[tuple[str, str, int, float, str | None]], max_types: int | None = None
    ) -> None:
        """Upsert ``(name, queue, max_attempts, timeout, backoff_json)`` for a worker's handlers.

        Raises:
            TooManyTaskTypes: the new ones would take the registry past ``max_types``.
        """
        async with self._connection() as connection, connection.transaction():
            await self._check_room(connection, [t[0] for t in types], max_types)
            await connection.execute(
                self.q["types_register"], *(list(column) for column in zip(*types, strict=True))
            )

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

    # ---------------------------------------------------------------- enqueue

    async def enqueue(
        self,
        tasks: Sequence[NewTask],
        connection: asyncpg.Connection | None = None,
        *,
        all_or_nothing: bool = False,
    ) -> list[Enqueued]:
        """Insert ``tasks`` in one statement, in one transaction unless ``connection`` is given.

        With ``all_or_nothing``, a conflict or an unknown type among them rolls the
        whole transaction back (nothing is created; the results say why).

        With ``connection``, the rows join the caller's open transaction and the
        relay is notified, so they are published once (and only if) it commits.

        Otherwise, unless ``all_or_nothing``, the insert runs as a statement of its
        own, which Postgres commits by itself: one round trip, where BEGIN, the
        insert and COMMIT took three. A single statement is atomic all the same,
        and the idempotent replays it skipped are committed rows, read after it.
        """
        async with self._connection(connection) as conn:
            if connection is not None:
                return await self._enqueue(conn, tasks, notify=True)
            if not all_or_nothing:
                return await self._enqueue(conn, tasks, notify=False)
            try:
                async with conn.transaction():
                    results = await self._enqueue(conn, tasks, notify=False)
                    if all_or_nothing and any(r.outcome in _REFUSED for r in results):
                        raise _Rollback(results)
            except _Rollback as rollback:
                return rollback.results
            return results

    async def _enqueue(
        self, conn: asyncpg.Connection, tasks: Sequence[NewTask], *, notify: bool
    ) -> list[Enqueued]:
        rows = await conn.fetch(
            self.q["enqueue"],
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
        )
        inserted = {row["id"]: row for row in rows}
        keys = [t.idempotency_key for t in tasks if t.id not in inserted and t.idempotency_key]
        existing = {}
        if keys:
            for row in await conn.fetch(self.q["enqueue_existing"], keys):
                existing[row["idempotency_key"]] = row
        results = []
        for task in tasks:
            row = inserted.get(task.id)
            if row is not None:
                results.append(Enqueued("created", _answer(row), row["delay"], row["generation"]))
                continue
            found = existing.get(task.idempotency_key) if task.idempotency_key else None
            if found is None:
                results.append(Enqueued("unknown_type"))
            elif found["request_fingerprint"] == task.fingerprint:
                results.append(Enqueued("replayed", _answer(found)))
            else:
                results.append(Enqueued("conflict", _answer(found)))
        if notify and inserted:
            ids = ",".join(str(task_id) for task_id in inserted)
            await conn.execute(self.q["enqueue_notify"], self.notify_channel, ids)
        return results

    async def notify_owed(self, ids: Sequence[uuid.UUID]) -> None:
        """Wake the active relay to publish the owed rows ``ids`` now, not after its grace."""
        async with self._connection() as conn:
            for start in range(0, len(ids), NOTIFY_IDS):
                payload = ",".join(str(task_id) for task_id in ids[start : start + NOTIFY_IDS])
                await conn.execute(self.q["enqueue_notify"], self.notify_channel, payload)

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
    ) -> list[Row]:
        """Set owed publishes ``(id, generation, reason)`` aside (see ``set_aside`` SQL).

        Returns the rows set aside: id, queue, and ``newly`` (not set aside before).
        """
        columns = _columns(sorted(items), 3)
        return await self.fetch("set_aside", *columns, retry_min, retry_max)

    # ---------------------------------------------------------------- reading

    async def task(self, task_id: uuid.UUID) -> Row | None:
        return await self.fetchrow("task_get", task_id)

    async def task_events(self, task_id: uuid.UUID) -> list[Row]:
        return await self.fetch("task_events", task_id)

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

    async def claim(self, ids: Sequence[uuid.UUID], worker_id: str, lease: float) -> list[Row]:
        """Claim deliveries: one row per distinct id with its ``decision`` (see ``claim`` SQL)."""
        return await self.fetch("claim", sorted(ids), worker_id, lease)

    async def heartbeat(
        self, claims: Sequence[tuple[uuid.UUID, uuid.UUID]], worker: WorkerInfo, lease: float
    ) -> dict[uuid.UUID, bool]:
        """Record the worker alive and extend the leases of its claims ``(id, token)``.

        Returns the tokens of the claims it still holds, each mapped to whether
        an operator asked to cancel the task.
        """
        ids, tokens = _columns(sorted(claims), 2)
        rows = await self.fetch(
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

    async def worker_gone(self, worker_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(self.q["worker_gone"], worker_id)

    async def complete(self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str]]) -> list[Row]:
        """Record successes ``(id, token, result_json)``; returns the rows recorded.

        Each row has id and status (CANCELLED if a cancel was requested meanwhile).
        An id missing from the answer was not held by that claim any more (stale).
        """
        return await self.fetch("complete", *_columns(sorted(items), 3))

    async def cancel_running(self, items: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> list[Row]:
        """Record claims ``(id, token)`` stopped on an operator's cancel request."""
        return await self.fetch("cancel_running", *_columns(sorted(items), 2))

    async def retry(self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str, float]]) -> list[Row]:
        """Record retryable failures ``(id, token, error, delay)``; returns the rows recorded."""
        return await self.fetch("retry", *_columns(sorted(items), 4))

    async def fail(self, items: Sequence[tuple[uuid.UUID, uuid.UUID, str]]) -> list[Row]:
        """Record terminal failures ``(id, token, error)``; returns the rows recorded."""
        return await self.fetch("fail", *_columns(sorted(items), 3))

    async def give_back(self, items: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> list[Row]:
        """Give back unfinished claims ``(id, token)`` at shutdown; the attempt does not count."""
        return await self.fetch("give_back", *_columns(sorted(items), 2))

    async def recover_expired(self, limit: int) -> list[Row]:
        """Take back up to ``limit`` claims whose lease expired; their publishes are owed."""
        return await self.fetch("recover_expired", limit)

    async def overdue_enqueued(self, queue: str, seconds: float, limit: int) -> list[uuid.UUID]:
        """ENQUEUED tasks of ``queue`` published and due more than ``seconds`` ago."""
        rows = await self.fetch("overdue_enqueued", queue, seconds, limit)
        return [row["id"] for row in rows]

    async def republish(self, ids: Sequence[uuid.UUID]) -> int:
        """Mark ENQUEUED tasks' publishes owed again, for the relay to pay at once."""
        async with self._connection() as conn:
            status: str = await conn.execute(self.q["republish"], list(ids))
        return int(status.split()[-1])


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


def _answer(row: Row) -> dict[str, Any]:
    return {name: row[name] for name in ANSWER_FIELDS}


def notify_channel(schema: str) -> str:
    """The channel that wakes the relay of the install in ``schema``: ``taskq_enqueued``
    for the default schema, so that each install in a database hears only its own."""
    return f"{schema}_enqueued"


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


# ---------------------------------------------------------------- lock sessions
# The statements of taskq.leader.SessionLock, each on its dedicated connection
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
