"""Handlers of the workflow fault scenario (``taskq worker tests.support.flow_handlers``).

Each attempt of either handler writes a row of ``flow_executions`` in the taskq
database when its handler starts (``clock_timestamp()``), and stamps it when the
handler returns, so that a test can count executions (a SIGKILLed attempt leaves
a row with no end) and order them: the callback's starts against the branches' ends.

- ``flow.branch`` — ``{"i": n, "seconds": x}``: sleeps x seconds and returns
  ``{"i": n}``; with ``"wait_for": PATH`` it first waits (up to 120 s) until the
  file PATH exists, so a test can hold one branch until the moment it chooses;
- ``flow.callback`` — records the ``i`` of each of its ``ctx.parent_results`` in
  their order (the column ``parents``) and returns how many it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any

import asyncpg

from taskq import load_settings
from taskq.handlers import Context, Registry

handlers = Registry()

BRANCH = "flow.branch"
CALLBACK = "flow.callback"
# Killed attempts count; what the scenario proves is about successes, not attempts.
MAX_ATTEMPTS = 20

_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _executions() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            settings = load_settings()
            pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
            # Two workers may race to create it; either way it exists afterwards.
            with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                await pool.execute(
                    "CREATE TABLE IF NOT EXISTS public.flow_executions ("
                    " task_id uuid NOT NULL, attempt int NOT NULL, kind text NOT NULL,"
                    " parents int[], started_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                    " finished_at timestamptz)"
                )
            _pool = pool
        return _pool


def _wait_for(path: str, timeout: float) -> None:
    """Block until the file ``path`` exists, ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


async def _started(ctx: Context, kind: str, parents: list[int] | None = None) -> None:
    pool = await _executions()
    await pool.execute(
        "INSERT INTO public.flow_executions (task_id, attempt, kind, parents)"
        " VALUES ($1, $2, $3, $4)",
        ctx.task_id,
        ctx.attempt,
        kind,
        parents,
    )


async def _finished(task_id: uuid.UUID, attempt: int) -> None:
    pool = await _executions()
    await pool.execute(
        "UPDATE public.flow_executions SET finished_at = clock_timestamp()"
        " WHERE task_id = $1 AND attempt = $2",
        task_id,
        attempt,
    )


@handlers.task(BRANCH, max_attempts=MAX_ATTEMPTS, timeout=300)
async def branch(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await _started(ctx, BRANCH)
    if path := payload.get("wait_for"):
        await asyncio.to_thread(_wait_for, path, 120.0)
    if payload.get("seconds"):
        await asyncio.sleep(float(payload["seconds"]))
    await _finished(ctx.task_id, ctx.attempt)
    return {"i": payload["i"]}


@handlers.task(CALLBACK, max_attempts=MAX_ATTEMPTS, timeout=300)
async def callback(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    seen = [r["i"] if isinstance(r, dict) else -1 for r in ctx.parent_results]
    await _started(ctx, CALLBACK, seen)
    await _finished(ctx.task_id, ctx.attempt)
    return {"results": len(seen)}
