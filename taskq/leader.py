"""Leadership: one active relay and one active sweeper across the fleet.

Each is held by a Postgres advisory lock on a dedicated connection
(:class:`~taskq.store.SessionLock`): whoever holds it does the work, and when
its process dies the connection, and with it the lock, goes too, so another
process takes over on its next try.

A process that is frozen (SIGSTOP, a VM pause, an event loop blocked by user
code) or cut off by a half-open connection keeps its TCP connection, so the
server would keep its lock for ever. The lock's session is therefore bounded on
the server's side:

- ``idle_session_timeout`` (Postgres 14 and later): a leader touches its lock
  connection on every pass, so only a frozen or cut-off leader stays idle for
  :data:`~taskq.store.LOCK_IDLE_TIMEOUT` seconds; the server then ends its
  session, which frees the lock, and a standby takes it on its next try (every
  pass, about a second): another process leads within about 16 s;
- TCP keepalives and ``tcp_user_timeout`` for the session, so that the server
  also drops a connection whose peer is gone (the only bound on Postgres 13).

A leader knows it holds the lock only as of its last round trip on that
connection, each bounded by :data:`~taskq.store.LOCK_CHECK_TIMEOUT`. Before
each step it takes as leader it calls :meth:`~taskq.store.SessionLock.ensure`,
which asks the server again once that knowledge is more than a second old: a
process resumed after a freeze finds out that it lost the lock before it acts
as leader again. What a resumed leader may still finish of a step begun before
the freeze is harmless: every duty is idempotent (a publish twice is a
duplicate the claim drops; the statements are guarded by the rows' state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from taskq.errors import LockLost, StoreError
from taskq.store import SessionLock

log = logging.getLogger("taskq.leader")

_DATABASE_ERRORS = (
    StoreError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


async def lead(
    lock: SessionLock,
    work: Callable[[], Awaitable[object]],
    *,
    interval: float,
    wake: asyncio.Event | None = None,
) -> None:
    """Run ``work`` every ``interval`` seconds (or when ``wake`` is set) while this
    process holds ``lock``, until cancelled.

    ``work`` calls ``lock.ensure()`` before each step it takes as leader. A
    database error ends the pass and gives the lock up, so that a process whose
    database connection works can take over.
    """
    while True:
        try:
            if await lock.hold():
                await work()
        except LockLost as exc:
            log.warning("%s", exc)
        except _DATABASE_ERRORS as exc:
            log.warning("%s pass failed: %s", lock.name, exc)
            await lock.release()
        except Exception:
            log.exception("%s pass failed", lock.name)
        if wake is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            wake.clear()
