"""Apply the numbered SQL migrations of ``taskq.sql`` to a database.

Safe to run repeatedly and concurrently: runs serialise on an advisory lock, each
migration applies in its own transaction together with its record in
``taskq_migrations``, and an applied migration is never applied again. A file
marked ``-- taskq:no-transaction`` (see :mod:`taskq.sql`) runs statement by
statement instead, and is recorded once all of them succeeded; an index it
builds ``CONCURRENTLY`` that an earlier failed run left invalid is dropped first.

Migrations run on a live system, so no statement may queue for a table lock for
long: each waits at most ``lock_timeout`` seconds (Postgres' ``lock_timeout``),
since a DDL statement waiting for its lock makes every later query of that
table wait behind it. A migration that cannot get its locks is rolled back (or,
run without a transaction, left to its idempotent statements) and tried again
a few times, then fails saying so; ``taskq migrate`` can simply run again.

Runs wait for each other's advisory lock by polling, not inside a statement: a
waiting statement holds a snapshot, which ``CREATE INDEX CONCURRENTLY`` in the
run holding the lock would wait for (a deadlock).

taskq's objects live in one schema (``TASKQ_DB_SCHEMA``, see :mod:`taskq.sql`).
The files before ``0007_own_schema`` name them unqualified, so every file runs
with ``search_path`` set to the schema the objects are in: the configured one,
or, for an install those files made before taskq had a schema of its own, the
schema where the connection's own ``search_path`` finds ``taskq_migrations``
(``public`` as a rule). ``0007_own_schema`` moves such an install's objects,
``taskq_migrations`` with them, into the configured schema.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import taskq.sql as sql
from taskq._utils import quote_ident
from taskq.errors import MigrationError, StoreError
from taskq.store import open_connection

# pg_advisory_lock key for migrations: "taskq" in ASCII, an arbitrary constant.
# One for every schema of the database: their runs wait for each other.
LOCK_KEY = 0x7461736B71
# What connecting raises when no server takes the connection: refused, timed out,
# rejected by the server, or (a multi-host URL with target_session_attrs) no host of
# the kind asked for, e.g. only a standby up (asyncpg's TargetServerAttributeNotMatched).
CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# The migration that moves an install made before it into its schema.
MOVE_MIGRATION = "own_schema"
# How long a statement may wait for a lock, how often a migration is tried, and
# how long a run waits between tries and between polls of the advisory lock.
LOCK_TIMEOUT = 5.0
LOCK_TRIES = 5
RETRY_WAIT = 2.0
POLL_SECONDS = 0.5


@dataclass
class MigrateReport:
    created_database: bool = False
    applied: list[str] = field(default_factory=list)
    current: int = 0


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if it does not exist. Returns whether it did.

    Raises:
        StoreError: if the server cannot be reached or refuses.
    """
    try:
        connection = await open_connection(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    except CONNECT_ERRORS as exc:
        raise StoreError(f"cannot connect to the database: {exc}") from exc
    else:
        await connection.close()
        return False
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    try:
        connection = await open_connection(maintenance)
    except CONNECT_ERRORS as exc:
        raise StoreError(f"database {name!r} is missing and cannot be created: {exc}") from exc
    try:
        # A database name is an identifier, not a value: it cannot be a bind parameter.
        await connection.execute(f"CREATE DATABASE {quote_ident(name)}")
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        return False  # another `taskq migrate` created it a moment ago
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot create database {name!r}: {exc}") from exc
    finally:
        await connection.close()
    return True


async def migrate(
    url: str,
    *,
    schema: str = sql.DEFAULT_SCHEMA,
    lock_timeout: float = LOCK_TIMEOUT,
    lock_tries: int = LOCK_TRIES,
    retry_wait: float = RETRY_WAIT,
    history_partition: float = 86400.0,
) -> MigrateReport:
    """Create the database if needed and apply every pending migration in order.

    Args:
        url: the database.
        schema: the schema of taskq's objects (created if missing; an install
            made before taskq had a schema of its own is moved into it).
        lock_timeout: seconds a statement may wait for a lock.
        lock_tries: how often a migration that cannot get its locks is tried.
        retry_wait: seconds before the second try, doubling for each further one.
        history_partition: the length in seconds of the task history's partitions
            that migration 0021 creates (``TASKQ_HISTORY_PARTITION``).

    Raises:
        MigrationError: if a migration fails, cannot get its locks, or an applied
            one was edited since.
        StoreError: if the database cannot be reached.
        ValueError: if ``schema`` cannot name a schema (see :func:`taskq.sql.check_schema`).
    """
    sql.check_schema(schema)
    report = MigrateReport(created_database=await ensure_database(url))
    queries = sql.queries(schema)
    try:
        connection = await open_connection(url)
    except CONNECT_ERRORS as exc:
        raise StoreError(f"cannot connect to the database: {exc}") from exc
    try:
        await _take_lock(connection)
        try:
            home = await _home(connection, schema)
            if not await connection.fetchval(queries["migrations_schema_exists"], schema):
                await connection.execute(queries["migrations_schema"])
            await _enter(connection, home)
            await connection.execute(sql.queries(home)["migrations_table"])
            await connection.execute(
                queries["migrations_lock_timeout"], str(round(lock_timeout * 1000))
            )
            await connection.execute(
                queries["migrations_history_partition"], str(history_partition)
            )
            applied = {
                row["version"]: row
                for row in await connection.fetch(sql.queries(home)["migrations_applied"])
            }
            for migration in sql.migrations():
                label = f"{migration.version:04d}_{migration.name}"
                checksum = _checksum(migration.sql)
                done = applied.get(migration.version)
                if done is not None:
                    if done["checksum"] != checksum:
                        raise MigrationError(
                            f"migration {label} was edited after it was applied; "
                            "add a new migration instead"
                        )
                    report.current = migration.version
                    continue
                moves = migration.name == MOVE_MIGRATION
                await _apply_with_retries(
                    connection,
                    migration.compiled(schema),
                    checksum,
                    schema if moves else home,
                    lock_timeout,
                    lock_tries,
                    retry_wait,
                )
                report.applied.append(label)
                report.current = migration.version
                if moves and home != schema:
                    home = schema
                    await _enter(connection, home)
        finally:
            await connection.execute(queries["migrations_unlock"], LOCK_KEY)
    except asyncpg.PostgresError as exc:
        raise StoreError(f"migrating failed: {exc}") from exc
    finally:
        await connection.close()
    return report


async def _home(connection: asyncpg.Connection, schema: str) -> str:
    """The schema taskq's objects are in now: ``schema``, unless an install made
    before taskq had a schema of its own is found where the connection's
    ``search_path`` leads (see the module); ``schema`` for a new install."""
    queries = sql.queries(schema)
    if await connection.fetchval(queries["migrations_table_in"], schema):
        return schema
    found: str | None = await connection.fetchval(queries["migrations_table_found"])
    if found is None:
        return schema
    # Another schema's install that the search_path happens to reach (a schema
    # named after the user, say) has been moved already: it is not to be moved again.
    done = await connection.fetch(sql.queries(found)["migrations_applied"])
    if any(row["name"] == MOVE_MIGRATION for row in done):
        return schema
    return found


async def _enter(connection: asyncpg.Connection, schema: str) -> None:
    """Resolve the migration files' unqualified names in ``schema``, for the session."""
    await connection.execute(sql.queries(schema)["migrations_search_path"], quote_ident(schema))


async def _take_lock(connection: asyncpg.Connection) -> None:
    """Wait for the migrations' advisory lock, between statements (see the module)."""
    query = sql.queries()["migrations_lock"]
    while True:
        if await connection.fetchval(query, LOCK_KEY):
            return
        await asyncio.sleep(POLL_SECONDS)


async def _apply_with_retries(
    connection: asyncpg.Connection,
    migration: sql.Migration,
    checksum: str,
    recorded_in: str,
    lock_timeout: float,
    tries: int,
    wait: float,
) -> None:
    label = f"{migration.version:04d}_{migration.name}"
    for attempt in range(1, tries + 1):
        try:
            await _apply(connection, migration, checksum, recorded_in)
            return
        except asyncpg.LockNotAvailableError as exc:
            if attempt == tries:
                undone = (
                    "nothing of it was applied"
                    if migration.transactional
                    else "its finished statements stay; the rest runs on the next try"
                )
                raise MigrationError(
                    f"migration {label} could not get its locks within {lock_timeout:g}s,"
                    f" {tries} times ({exc}): long transactions hold them (see"
                    f" pg_stat_activity); {undone}. Run taskq migrate again"
                ) from exc
            await asyncio.sleep(wait * 2 ** (attempt - 1))
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"migration {label} failed: {exc}") from exc
        except ValueError as exc:
            raise MigrationError(f"migration {label} cannot run: {exc}") from exc


async def _apply(
    connection: asyncpg.Connection, migration: sql.Migration, checksum: str, recorded_in: str
) -> None:
    """Apply one migration and record it in ``recorded_in``'s ``taskq_migrations``
    (where the table is once the migration ran): in one transaction, or statement
    by statement, in the schema the session's search_path names."""
    record = sql.queries(recorded_in)["migrations_record"]
    if migration.transactional:
        async with connection.transaction():
            await connection.execute(migration.sql)
            await connection.execute(record, migration.version, migration.name, checksum)
        return
    statements = migration.statements()
    invalid = await connection.fetch(
        sql.queries(recorded_in)["migrations_invalid_indexes"],
        migration.concurrent_indexes(),
        recorded_in,
    )
    for row in invalid:
        # Left by a failed CREATE INDEX CONCURRENTLY: IF NOT EXISTS would keep it as it is.
        # Index names are identifiers, which cannot be bind parameters.
        name = f"{quote_ident(row['schema'])}.{quote_ident(row['name'])}"
        await connection.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    for statement in statements:
        await connection.execute(statement)
    await connection.execute(record, migration.version, migration.name, checksum)
