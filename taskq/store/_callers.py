"""Callers' connections: the statements of an enqueue on a connection its caller
gave, asyncpg's or psycopg 3's, in the caller's transaction.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import asyncpg

import taskq.sql as sql
from taskq.store._errors import _wrapped

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
