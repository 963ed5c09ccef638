"""Workload 7 of `scripts/bench`: how soon ``Client.wait`` returns once a task has ended
(issue #16: p50 <= 10 ms, p99 <= 50 ms).

Each task is a ``demo.sleep`` of :data:`SLEEP` seconds, enqueued and waited for at
once, one every :data:`INTERVAL` seconds, so that many waits overlap on the one
LISTEN connection of the client, and each waiter has marked its task before it
ends: the figure is the notification's way (the worker's commit, the NOTIFY, the
client's read of the row), not the read of a task that ended already.

The latency is the benchmark's ``time.time()`` when ``wait`` returned minus the
task's ``finished_at``, both on the machine's wall clock. ``finished_at`` is
``now()`` of the worker's ``complete`` statement, the start of its transaction: the
figure includes that statement and its commit, so it bounds the time from the
commit from above.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from benchlib import Sandbox, percentile

from taskq.client import Client

SLEEP = 0.3
INTERVAL = 0.02
FINISHED = """
SELECT id, extract(epoch FROM finished_at)::float8 AS finished
FROM taskq.tasks WHERE id = ANY($1::uuid[])
"""


async def wait_latency(sandbox: Sandbox, count: int) -> list[tuple[str, float, str, str]]:
    """The figures: ``(name, value, unit, target)``."""
    returned: dict[uuid.UUID, float] = {}
    async with Client.connect(sandbox.settings) as client:

        async def one() -> None:
            enqueued = await client.enqueue("demo.sleep", {"seconds": SLEEP})
            await client.wait(enqueued.id, timeout=60)
            returned[enqueued.id] = time.time()

        waits = []
        for _ in range(count):
            waits.append(asyncio.create_task(one()))
            await asyncio.sleep(INTERVAL)
        await asyncio.gather(*waits)
        connects = client.waiters.connects
    rows = await sandbox.db.fetch(FINISHED, list(returned))
    latencies = [(returned[row["id"]] - row["finished"]) * 1000 for row in rows]
    return [
        (f"finished_at -> Client.wait returned, p50 ({count} waits)", percentile(latencies, 0.5),
         "ms", "<= 10"),
        ("  p99", percentile(latencies, 0.99), "ms", "<= 50"),
        ("  max", max(latencies), "ms", ""),
        ("  LISTEN connections the client opened", connects, "", "1"),
    ]  # fmt: skip
