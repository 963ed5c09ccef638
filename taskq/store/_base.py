"""The store's core: the pool, the private helpers that run a named statement (every
part of :class:`~taskq.store.Store` builds on them), and the NOTIFY that wakes the relay.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import asyncpg

import taskq.sql as sql
from taskq.errors import RejectedByDatabase, StoreError
from taskq.model import OwedPublish
from taskq.store._callers import _Statements
from taskq.store._channels import finished_channel, notify_channel, queues_channel
from taskq.store._connect import open_connection
from taskq.store._errors import _DOWN, lost, refused

# Task ids per NOTIFY: a payload holds at most 8000 bytes, an id and its comma 37.
NOTIFY_IDS = 200
# Named prepared statements each pooled connection keeps (asyncpg's default).
STATEMENT_CACHE = 100


class StoreBase:
    """The pool of connections every part of :class:`~taskq.store.Store` runs its
    statements on, and the private helpers that run them."""

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
        statement_cache: bool = True,
        schema: str = sql.DEFAULT_SCHEMA,
    ) -> Self:
        """Open a pool. Raises :class:`StoreError` if the database cannot be reached.

        With ``session_reset=False`` a connection going back to the pool is only
        rolled back if a transaction is open, instead of also running asyncpg's
        reset query (unlock all, close all, unlisten, reset all): one round trip
        less per statement, for callers that never leave session state behind.
        With ``statement_cache=False`` (``url`` is PgBouncer in transaction mode)
        statements run unprepared: asyncpg's unnamed statements, each parsed and
        run within one server connection.
        """
        sql.check_schema(schema)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=10,
                timeout=5,
                statement_cache_size=STATEMENT_CACHE if statement_cache else 0,
                connect=open_connection,  # several hosts: the writable one, tried at once
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
                    try:
                        yield acquired
                    except _DOWN as exc:
                        if lost(exc):
                            await self._forget(acquired)
                        raise
        except StoreError:
            raise
        except _DOWN as exc:
            if refused(exc):
                raise RejectedByDatabase(f"the database refused the data: {exc}") from exc
            raise StoreError(f"database error: {exc}") from exc

    async def _forget(self, connection: asyncpg.Connection) -> None:
        """After ``connection`` lost its server (or its server stopped answering):
        terminate it rather than give it back to the pool, whose reset would wait on
        it, and retire the pool's other connections, which most likely went with it
        (a failover: the next ones are opened on whichever host accepts writes now).
        """
        connection.terminate()
        await self.pool.expire_connections()

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

    async def _notify(self, ids: Sequence[uuid.UUID], conn: _Statements) -> None:
        """Name ``ids`` to the relay (see ``enqueue_notify`` SQL), NOTIFY_IDS a payload."""
        for start in range(0, len(ids), NOTIFY_IDS):
            payload = ",".join(str(task_id) for task_id in ids[start : start + NOTIFY_IDS])
            await conn.execute("enqueue_notify", self.notify_channel, payload)


def _owed(rows: Sequence[asyncpg.Record]) -> list[OwedPublish]:
    from_row = OwedPublish.from_row
    return [from_row(row) for row in rows]


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A pool reset that adds nothing to asyncpg's rollback of an open transaction."""


def _columns(items: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of a batch as ``width`` column lists (the arrays an ``unnest`` statement takes)."""
    if not items:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*items, strict=True)]
