"""A handler that kills its worker process outright (``taskq worker tests.support.crashing``):
no shutdown, no rollback sent, no settlement of its deliveries."""

from __future__ import annotations

import os
from typing import Any

from taskq.handlers import Context, Registry

handlers = Registry()

CRASH_EXIT_CODE = 17


@handlers.task("crash.exit", max_attempts=3)
async def crash(payload: dict[str, Any], ctx: Context) -> None:
    os._exit(CRASH_EXIT_CODE)
