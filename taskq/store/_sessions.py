"""Lock sessions: the statements of :class:`taskq.fleet.leader.SessionLock`."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

import taskq.sql as sql

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
