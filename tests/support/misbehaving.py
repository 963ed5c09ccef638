"""Handlers that misbehave in every way a worker must contain (``taskq worker tests.misbehaving``).

Each one that could run for ever stops after ``{"seconds": x}`` (default 30), so a
test's processes and event loops always end.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from taskq.handlers import Context, Registry

handlers = Registry()


class Custom(BaseException):
    """A BaseException that is not an Exception, of the handler's own."""


@handlers.task("bad.base_exception", max_attempts=1)
async def base_exception(payload: dict[str, Any], ctx: Context) -> None:
    raise Custom("a BaseException of its own")


@handlers.task("bad.exit", max_attempts=1)
async def exits(payload: dict[str, Any], ctx: Context) -> None:
    sys.exit(3)


@handlers.task("bad.exit_sync", max_attempts=1)
def exits_sync(payload: dict[str, Any], ctx: Context) -> None:
    sys.exit(4)


@handlers.task("bad.interrupt", max_attempts=1)
async def interrupts(payload: dict[str, Any], ctx: Context) -> None:
    raise KeyboardInterrupt


@handlers.task("bad.cancelled", max_attempts=1)
async def cancelled(payload: dict[str, Any], ctx: Context) -> None:
    raise asyncio.CancelledError("a CancelledError taskq did not cause")


@handlers.task("bad.generator_exit", max_attempts=1)
async def generator_exit(payload: dict[str, Any], ctx: Context) -> None:
    raise GeneratorExit


@handlers.task("bad.swallow", max_attempts=1, timeout=3600)
async def swallow(payload: dict[str, Any], ctx: Context) -> str:
    """Ignores every cancellation until ``seconds`` have passed."""
    until = time.monotonic() + float(payload.get("seconds", 30))
    while time.monotonic() < until:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            continue
    return "swallowed"


@handlers.task("bad.block", max_attempts=1, timeout=3600)
def block(payload: dict[str, Any], ctx: Context) -> str:
    """A sync handler that blocks its thread for ``seconds``, ignoring everything."""
    time.sleep(float(payload.get("seconds", 30)))
    return "blocked"


@handlers.task("bad.huge", max_attempts=3)
def huge(payload: dict[str, Any], ctx: Context) -> str:
    return "x" * int(payload.get("bytes", 2 * 1024 * 1024))


@handlers.task("ok.noop")
async def noop(payload: dict[str, Any], ctx: Context) -> str:
    return "ok"
