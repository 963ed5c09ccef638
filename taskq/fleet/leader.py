"""Leadership: one active relay and one active sweeper across the fleet.

Each is held by a Postgres advisory lock on a dedicated connection
(:class:`SessionLock`): whoever holds it does the work, and when its process
dies the connection, and with it the lock, goes too, so another process takes
over on its next try.

A process that is frozen (SIGSTOP, a VM pause, an event loop blocked by user
code) or cut off by a half-open connection keeps its TCP connection, so the
server would keep its lock for ever. The lock's session is therefore bounded on
the server's side:

- ``idle_session_timeout`` (Postgres 14 and later): a leader touches its lock
  connection on every pass, so only a frozen or cut-off leader stays idle for
  :data:`LOCK_IDLE_TIMEOUT` seconds; the server then ends its session, which
  frees the lock, and a standby takes it on its next try (every pass, about a
  second): another process leads within about 16 s;
- TCP keepalives and ``tcp_user_timeout`` for the session, so that the server
  also drops a connection whose peer is gone (the only bound on Postgres 13).

A leader knows it holds the lock only as of its last round trip on that
connection, each bounded by :data:`LOCK_CHECK_TIMEOUT`. Before each step it
takes as leader it calls :meth:`SessionLock.ensure`, which asks the server
again once that knowledge is more than a second old: a process resumed after a
freeze finds out that it lost the lock before it acts as leader again. What
a resumed leader may still finish of a step begun before the freeze is
harmless: every duty is idempotent (a publish twice is a duplicate the claim
drops; the statements are guarded by the rows' state).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

import asyncpg

import taskq.sql as sql
from taskq import store
from taskq.errors import LockLost, StoreError
from taskq.service import raise_if_cancelled

log = logging.getLogger("taskq.leader")

# Seconds a lock session may stay idle before the server ends it (and frees the
# lock). Passes touch it every second; a step between two checks (a statement
# and a publish, each with a 10 s timeout) rarely lasts longer.
LOCK_IDLE_TIMEOUT = 15.0
# TCP keepalive of the lock session, server side: first probe after 5 s of
# silence, then every 2 s, 3 unanswered probes drop it; unacknowledged data
# drops it after 15 s.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3
LOCK_USER_TIMEOUT = 15.0
# A round trip on the lock connection that takes longer means the lock is lost.
LOCK_CHECK_TIMEOUT = 5.0
# A leader's knowledge of its lock older than this is checked again before it acts.
LOCK_RECHECK_AFTER = 1.0


_DOWN = store.DATABASE_DOWN
_DATABASE_ERRORS = (StoreError, *_DOWN)


def lock_key(key: int, schema: str) -> int:
    """The advisory lock ``key`` of the install in ``schema``.

    Advisory locks belong to the database, not to a schema: two installs in one
    database (two ``TASKQ_DB_SCHEMA``) each need a relay and a sweeper of their
    own. The default schema keeps ``key`` itself, which is what processes of
    earlier versions take; another schema gets a key derived from both.
    """
    if schema == sql.DEFAULT_SCHEMA:
        return key
    digest = hashlib.sha256(f"{key}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class SessionLock:
    """A Postgres advisory lock held as long as a dedicated connection lives.

    It keeps one relay and one sweeper active across the fleet: whoever holds
    the lock does the work, and if its process dies, freezes or is cut off, the
    session ends (see above), and with it the lock, so another process takes
    over on its next try.

    Args:
        url: the database.
        key: the advisory lock's key.
        name: what the lock makes active (``relay``, ``sweeper``), for logs and
            the session's ``application_name``.
        idle_timeout: seconds of idleness after which the server ends the session.
    """

    def __init__(
        self, url: str, key: int, name: str, *, idle_timeout: float = LOCK_IDLE_TIMEOUT
    ) -> None:
        self._url = url
        self._key = key
        self.name = name
        self._idle_timeout = idle_timeout
        self.connection: asyncpg.Connection | None = None
        self.held = False
        self._confirmed_at = -1e9

    async def hold(self) -> bool:
        """Whether this process holds the lock now; tries to take it if not.

        Raises:
            StoreError: if the database cannot be reached (the lock is then lost).
        """
        try:
            if self.connection is None or self.connection.is_closed():
                self._drop("its connection closed")
                self.connection = await self._connect()
            if self.held:
                # Fails if the session ended, and with it the lock.
                await store.session_alive(self.connection, LOCK_CHECK_TIMEOUT)
            elif await store.try_session_lock(self.connection, self._key, LOCK_CHECK_TIMEOUT):
                self.held = True
                log.info("this process is the active %s", self.name)
        except _DOWN as exc:
            self._drop(f"{type(exc).__name__}: {exc}")
            raise StoreError(f"the {self.name} lock's connection failed: {exc}") from exc
        if self.held:
            self._confirmed_at = time.monotonic()
        return self.held

    async def ensure(self) -> None:
        """Return if this process still holds the lock, else raise :class:`LockLost`.

        Asks the server again when the last confirmation is older than
        :data:`LOCK_RECHECK_AFTER` seconds: the process may have been frozen meanwhile.

        Raises:
            LockLost: the lock is someone else's now (or nobody's).
            StoreError: the lock's connection failed (the lock is lost too).
        """
        if self.held and time.monotonic() - self._confirmed_at <= LOCK_RECHECK_AFTER:
            return
        if not self.held or not await self.hold():
            raise LockLost(f"this process is no longer the active {self.name}")

    async def _connect(self) -> asyncpg.Connection:
        application = f"taskq {self.name} lock, pid {os.getpid()}"
        connection = await store.open_connection(
            self._url, timeout=5, server_settings={"application_name": application[:63]}
        )
        limits = (
            str(round(self._idle_timeout * 1000)),
            str(KEEPALIVE_IDLE),
            str(KEEPALIVE_INTERVAL),
            str(KEEPALIVE_COUNT),
            str(round(LOCK_USER_TIMEOUT * 1000)),
        )
        try:
            applied = await store.lock_session_limits(connection, limits, LOCK_CHECK_TIMEOUT)
        except BaseException:
            connection.terminate()
            raise
        if "idle_session_timeout" not in applied:
            log.warning(
                "Postgres before 14 has no idle_session_timeout: a frozen %s keeps its lock"
                " until its connection drops",
                self.name,
            )
        return connection

    def _drop(self, why: str) -> None:
        """Forget the connection without waiting on it (it may be half-open)."""
        if self.held:
            log.warning("this process is no longer the active %s: %s", self.name, why)
        self.held = False
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()

    async def release(self) -> None:
        """Give the lock up: close its connection."""
        self.held = False
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), LOCK_CHECK_TIMEOUT)
            if not connection.is_closed():
                connection.terminate()


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
    database connection works can take over. A cancellation ends the loop even
    if a step swallowed it (see :func:`taskq.service.raise_if_cancelled`): a
    worker's stop waited for ever for its sweeper once a pass's depth read,
    cancelled while it opened its channel, returned as usual (aiormq logged
    "Closing channel ... because RPC call Channel.Open cancelled").
    """
    while True:
        # A cancellation a step swallowed (see raise_if_cancelled) ends the loop here.
        raise_if_cancelled()
        try:
            if await lock.hold():
                await work()
        except LockLost as exc:
            log.info("%s", exc)
        except _DATABASE_ERRORS as exc:
            log.warning("%s pass failed: %s", lock.name, exc)
            await lock.release()
        except Exception:
            log.exception("%s pass failed", lock.name)
        raise_if_cancelled()
        if wake is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            wake.clear()
