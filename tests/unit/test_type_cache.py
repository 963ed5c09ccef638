"""taskq.enqueue.task_types.TypeCache: a stale snapshot answers while a newer one is read."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from taskq.enqueue import task_types
from taskq.enqueue.task_types import TYPES_TTL, TypeCache
from taskq.model import TaskTypeRecord

NOW = datetime(2026, 12, 7, tzinfo=UTC)


class GatedRegistry:
    """The registry's reads, each waiting for the gate once it is closed."""

    def __init__(self) -> None:
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def task_types(self) -> list[TaskTypeRecord]:
        self.reads += 1
        await self.gate.wait()
        return [TaskTypeRecord("a.v1", "default", 5, 300.0, None, None, True, NOW, NOW)]


async def test_a_stale_snapshot_answers_at_once_and_refreshes_behind(monkeypatch: Any) -> None:
    now = [1000.0]
    monkeypatch.setattr("taskq.enqueue.task_types.time.monotonic", lambda: now[0])
    registry = GatedRegistry()
    cache = TypeCache(registry)  # type: ignore[arg-type]
    assert (await cache.get("a.v1")) is not None
    assert registry.reads == 1

    registry.gate.clear()
    now[0] += TYPES_TTL + 0.5  # stale: read again, but not on this caller's way
    found = await asyncio.wait_for(cache.get("a.v1"), 5)
    assert found is not None and found.name == "a.v1"
    assert registry.reads == 2  # the read under way
    assert (await asyncio.wait_for(cache.get("a.v1"), 5)) is not None
    assert registry.reads == 2  # shared, not one more
    registry.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)

    # Far older (the database was away meanwhile): the caller waits for the read.
    now[0] += TYPES_TTL * task_types.STALE_FACTOR + 1
    registry.gate.clear()
    waiting = asyncio.create_task(cache.get("a.v1"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waiting.done()
    registry.gate.set()
    assert (await waiting) is not None
