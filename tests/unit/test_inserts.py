"""taskq.enqueue.inserts: single enqueues grouped into statements whose size follows the load."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from taskq.enqueue import inserts
from taskq.enqueue.inserts import InsertBatcher
from taskq.model import EnqueueOutcome
from taskq.store import Enqueued, NewTask


def new_task(n: int) -> NewTask:
    return NewTask(id=uuid.uuid4(), type="demo.noop", payload_json=f'{{"n": {n}}}')


class GatedStore:
    """A store whose statements wait until the test opens their gate, in order."""

    def __init__(self) -> None:
        self.statements: list[list[NewTask]] = []
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()

    async def enqueue(self, tasks: Sequence[NewTask], *_: Any, **__: Any) -> list[Enqueued]:
        self.statements.append(list(tasks))
        gate = asyncio.Event()
        self.gates.append(gate)
        self.started.set()
        await gate.wait()
        return [Enqueued(EnqueueOutcome.CREATED, {"id": t.id}) for t in tasks]

    async def wait_statements(self, count: int) -> None:
        while len(self.statements) < count:
            self.started.clear()
            await self.started.wait()


async def test_one_statement_at_a_time_and_what_comes_meanwhile_goes_next_as_one() -> None:
    store = GatedStore()
    batcher = InsertBatcher(store)  # type: ignore[arg-type]
    await batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(new_task(0)))
        await store.wait_statements(1)
        assert len(store.statements[0]) == 1  # nothing waited for company
        rest = [asyncio.create_task(batcher.submit(new_task(n))) for n in range(1, 11)]
        await asyncio.sleep(0.01)
        assert len(store.statements) == 1  # the ten wait for the running statement
        store.gates[0].set()
        await first
        await store.wait_statements(2)
        assert [len(s) for s in store.statements] == [1, 10]
        store.gates[1].set()
        await asyncio.gather(*rest)
    finally:
        await batcher.stop()


async def test_a_stalled_statement_does_not_hold_up_the_next(monkeypatch: Any) -> None:
    monkeypatch.setattr(inserts, "STALL_SECONDS", 0.01)
    store = GatedStore()
    created: list[Enqueued] = []
    batcher = InsertBatcher(store, on_inserted=created.extend)  # type: ignore[arg-type]
    await batcher.start()
    try:
        stalled = asyncio.create_task(batcher.submit(new_task(0)))
        await store.wait_statements(1)
        other = asyncio.create_task(batcher.submit(new_task(1)))
        await store.wait_statements(2)  # beside the first, which still waits
        store.gates[1].set()
        assert (await other).outcome == "created"
        assert not stalled.done()
        store.gates[0].set()
        assert (await stalled).outcome == "created"
        # The rows were handed on before their callers resumed.
        assert {r.task_id for r in created if r.answer} == {
            t.id for s in store.statements for t in s
        }
    finally:
        await batcher.stop()


def test_task_ids_are_version_7_and_grow_with_time(monkeypatch: Any) -> None:
    from taskq import _utils

    before = time.time_ns() // 1_000_000
    ids = [_utils.task_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert all(before <= i.int >> 80 <= after for i in ids)  # the time in ms leads
    clock = [1_800_000_000_000_000_000]
    monkeypatch.setattr("taskq._utils.time.time_ns", lambda: clock[0])
    earlier = [_utils.task_id() for _ in range(100)]
    clock[0] += 1_000_000  # a millisecond later
    later = [_utils.task_id() for _ in range(100)]
    assert max(earlier) < min(later)
