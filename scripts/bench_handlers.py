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

__all__ = ["NOOP_MODEL", "STAMP", "handlers"]

STAMP = "bench.stamp"
NOOP_MODEL = "bench.noop_model"


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
