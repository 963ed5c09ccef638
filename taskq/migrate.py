"""Apply the numbered SQL migrations of ``taskq.sql`` to a database.

Safe to run repeatedly and concurrently: runs serialise on an advisory lock, each
migration applies in its own transaction together with its record in
``taskq_migrations``, and an applied migration is never applied again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import taskq.sql as sql
from taskq._utils import quote_ident
from taskq.errors import MigrationError, StoreError

# pg_advisory_lock key for migrations: "taskq" in ASCII, an arbitrary constant.
LOCK_KEY = 0x7461736B71


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
        connection = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to the database: {exc}") from exc
    else:
        await connection.close()
        return False
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    try:
        connection = await asyncpg.connect(maintenance)
    except (OSError, asyncpg.PostgresError) as exc:
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


async def migrate(url: str) -> MigrateReport:
    """Create the database if needed and apply every pending migration in order.

    Raises:
        MigrationError: if a migration fails or an applied one was edited since.
        StoreError: if the database cannot be reached.
    """
    report = MigrateReport(created_database=await ensure_database(url))
    queries = sql.queries()
    try:
        connection = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to the database: {exc}") from exc
    try:
        await connection.execute(queries["migrations_lock"], LOCK_KEY)
        try:
            await connection.execute(queries["migrations_table"])
            applied = {
                row["version"]: row for row in await connection.fetch(queries["migrations_applied"])
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
                try:
                    async with connection.transaction():
                        await connection.execute(migration.sql)
                        await connection.execute(
                            queries["migrations_record"],
                            migration.version,
                            migration.name,
                            checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {label} failed: {exc}") from exc
                report.applied.append(label)
                report.current = migration.version
        finally:
            await connection.execute(queries["migrations_unlock"], LOCK_KEY)
    except asyncpg.PostgresError as exc:
        raise StoreError(f"migrating failed: {exc}") from exc
    finally:
        await connection.close()
    return report
