"""The task type registry: the types, their rate limits, and the operators' rate limiters."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import asyncpg
import orjson

from taskq.errors import LimiterInUse, TooManyLimiters, TooManyTaskTypes, UnknownLimiter
from taskq.model import Concurrency, LimiterRecord, TaskTypeRecord
from taskq.ratelimits import MAX_LIMITERS, RateLimit, own_limiter
from taskq.store._gates import GatesStore

# pg_advisory_xact_lock key of the registry's writers: "types" in ASCII.
TYPES_LOCK_KEY = 0x7479706573
# ... and of rate limiters, for the check against MAX_LIMITERS: "limit".
LIMITERS_LOCK_KEY = 0x6C696D6974


class TypesStore(GatesStore):
    """The task types and the rate limiters."""

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
