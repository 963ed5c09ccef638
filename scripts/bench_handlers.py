"""The handlers of the benchmark's workers: taskq's demo handlers and ``bench.stamp``.

The workers run ``taskq worker bench_handlers`` (with ``scripts/`` on
``PYTHONPATH``): the registry of :mod:`taskq.demo` (``demo.noop``, and
``demo.noop_sync`` where that branch has it), plus the handlers added to it in
the worker's process only.

``bench.stamp`` returns the wall-clock time at which it started. taskq records
no per-task time after the claim's, so this is the start-latency breakdown's
last boundary ("handler start"); the handler itself costs what ``demo.noop``
does, and its result (one number) is written after that boundary.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from taskq.demo import handlers
from taskq.handlers import Context

__all__ = ["COLLECT", "NOOP_MODEL", "SLEEP_SYNC", "STAMP", "handlers"]

STAMP = "bench.stamp"
NOOP_MODEL = "bench.noop_model"
SLEEP_SYNC = "bench.sleep_sync"
COLLECT = "bench.collect"


@handlers.task(STAMP)
async def stamp(payload: dict[str, Any], ctx: Context) -> float:
    # time.time() reads CLOCK_REALTIME, as Postgres's now() and clock_timestamp() do.
    return time.time()


class Numbered(BaseModel):
    """The benchmark's payload (``{"i": n}``) as a payload model."""

    i: int


@handlers.task(NOOP_MODEL)
async def noop_model(payload: Numbered, ctx: Context) -> None:
    """``demo.noop`` with a payload model: the payload parsed, its schema checked at enqueue."""
    return None


@handlers.task(SLEEP_SYNC)
def sleep_sync(payload: dict[str, Any], ctx: Context) -> None:
    """A sync handler that blocks its thread for 2 ms (a short call to a service, say):
    with 32 threads, a claimed batch of more than 32 cannot all end in a 5 ms window."""
    time.sleep(0.002)


@handlers.task(COLLECT)
async def collect(payload: dict[str, Any], ctx: Context) -> int:
    """A workflow's callback (scripts/bench_workflows.py): the number of its parents' results,
    which the worker reads before it starts."""
    return len(ctx.parent_results)
