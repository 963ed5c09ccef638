"""Driver errors as the store sees them: a database going away, and data it refuses
for good, which trying again cannot help.
"""

from __future__ import annotations

import asyncpg

from taskq.errors import RejectedByDatabase, StoreError

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


# SQLSTATEs that say the session's server is gone or the wrong one: connection
# exceptions (class 08), the server shutting down or crashed (57P01, 57P02), not
# accepting connections yet (57P03), and a read-only server (25006: a standby,
# where the session was to be on the primary).
_LOST_STATES = frozenset({"57P01", "57P02", "57P03", "25006"})


def lost(exc: BaseException) -> bool:
    """Whether a driver error says the connection is no use any more: it broke, its
    server did not answer in time (a statement timeout), or its server is shutting
    down or not the writable one. A statement the server refused (a constraint, a
    deadlock, a lock timeout) leaves the connection good."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.InternalClientError):
        return True
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return isinstance(state, str) and (state[:2] == "08" or state in _LOST_STATES)


def refused(exc: BaseException) -> bool:
    """Whether a driver error can never succeed when tried again (see ``_REFUSED_CLASSES``).

    asyncpg raises its ``DataError`` also for an argument it cannot encode
    (an integer out of range), before anything reaches the server.
    """
    if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
        return True
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return isinstance(state, str) and state[:2] in _REFUSED_CLASSES


def _wrapped(exc: Exception, refused_data: bool) -> StoreError:
    """The taskq error for a driver's ``exc``; ``refused_data``: the driver says the data
    itself was refused (psycopg's DataError and IntegrityError, raised before or by the
    server), which the same data meets again."""
    state = getattr(exc, "sqlstate", None)
    if refused_data or (isinstance(state, str) and state[:2] in _REFUSED_CLASSES):
        return RejectedByDatabase(f"the database refused the data: {exc}")
    return StoreError(f"database error: {exc}")
