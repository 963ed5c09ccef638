"""Demo handlers, shipped for the README, the tests and the benchmarks.

Run them with ``taskq worker taskq.demo``:

- ``email.send.v1`` — a stub that logs and answers ``{"sent": true, "to": ...}``;
- ``demo.noop`` — does nothing (benchmarks); ``demo.noop_sync`` too, as a plain
  function run in a worker thread;
- ``demo.echo`` — returns its payload;
- ``demo.sleep`` — ``{"seconds": x}`` sleeps x seconds, reporting its progress every second;
- ``demo.fail`` — ``{"times": n}`` fails the first n attempts and then succeeds;
  without ``times`` it always fails; ``{"fatal": true}`` fails for good at once;
- ``demo.record`` — inserts a row into ``demo_executions`` in the taskq database
  (after sleeping ``{"seconds": x}`` if given), so tests can count executions.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from taskq import Context, Fail, Registry, load_settings
from taskq.store import DATABASE_DOWN, connection_lost, open_connection

# Seconds the demo.record insert may take before the attempt fails.
RECORD_TIMEOUT = 10.0

handlers = Registry()


class DemoFailure(RuntimeError):
    """The failure ``demo.fail`` was asked for."""


@handlers.task("email.send.v1", max_attempts=5, timeout=30)
async def send_email(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    ctx.log.info("sending email to %s (stub)", payload.get("to"))
    return {"sent": True, "to": payload.get("to")}


@handlers.task("demo.noop")
async def noop(payload: dict[str, Any], ctx: Context) -> None:
    return None


@handlers.task("demo.noop_sync")
def noop_sync(payload: dict[str, Any], ctx: Context) -> None:
    return None


@handlers.task("demo.echo")
async def echo(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return payload


@handlers.task("demo.sleep", timeout=3600)
async def sleep(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    seconds = float(payload.get("seconds", 1.0))
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        # Clamped: (start + seconds) - start can exceed seconds in floating point.
        await ctx.progress(min(1.0, max(0.0, 1 - left / seconds)), {"left": round(left, 1)})
        await asyncio.sleep(min(left, 1.0))
    await ctx.progress(1.0)
    return {"slept": seconds}


@handlers.task("demo.fail")
async def fail(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if payload.get("fatal"):
        raise Fail("demo.fail was asked to fail for good")
    times = payload.get("times")
    if times is None or ctx.attempt <= int(times):
        raise DemoFailure(f"demo failure on attempt {ctx.attempt}")
    return {"succeeded_on_attempt": ctx.attempt}


_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _record_pool() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            settings = load_settings()
            pool = await asyncpg.create_pool(
                settings.database_url,
                min_size=1,
                max_size=4,
                statement_cache_size=100 if settings.statement_cache else 0,
                connect=open_connection,
            )
            # Two workers may race to create it; either way it exists afterwards.
            with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                await pool.execute(
                    "CREATE TABLE IF NOT EXISTS demo_executions ("
                    " task_id uuid NOT NULL, attempt int NOT NULL, worker_id text NOT NULL,"
                    " at timestamptz NOT NULL DEFAULT clock_timestamp())"
                )
            _pool = pool
        return _pool


@handlers.task("demo.record", timeout=3600)
async def record(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if payload.get("seconds"):
        await asyncio.sleep(float(payload["seconds"]))
    pool = await _record_pool()
    async with pool.acquire() as connection:
        try:
            await connection.execute(
                "INSERT INTO demo_executions (task_id, attempt, worker_id) VALUES ($1, $2, $3)",
                ctx.task_id,
                ctx.attempt,
                ctx.worker_id,
                timeout=RECORD_TIMEOUT,
            )
        except DATABASE_DOWN as exc:
            # A server that stopped answering (frozen, or its machine gone) would keep
            # the pool waiting on this connection: drop it and the pool's others, so
            # the next attempt connects afresh (to the new primary after a failover).
            if connection_lost(exc):
                connection.terminate()
                await pool.expire_connections()
            raise
    return {"recorded": True}
