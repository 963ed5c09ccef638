"""Concurrency limits end to end: the rate with a limit of 2 on each of 100 keys,
against the same tasks unlimited.

Starts K worker processes against a fresh database and namespace, then runs the
same workload twice on ``demo.noop`` (or, with ``--seconds S``, ``demo.sleep`` for
S seconds a task): first without a limit, then with
``concurrency={"key": "customer", "limit": 2}`` (set through the store, as
``PUT /types`` does). Each run enqueues N tasks (``{"customer": "c<n % 100>"}``,
batches of 500 through the Python client) and waits for the last to succeed; the
rate is N over the time from the first enqueue to the last success. After the
limited run it checks that every slot was given back and nothing is left waiting,
and counts the released tasks the worker that freed their slot took at once.
Prints a table and JSON lines, with the CPU seconds per 1,000 tasks of each run:
the workers (summed), and every Postgres and RabbitMQ process on the machine
(other work on a shared machine counts there too).

    .venv/bin/python scripts/bench_concurrency.py [--tasks 10000] [--keys 100] [--limit 2]
        [--workers 2] [--seconds 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

from benchlib import Sandbox, cpu_now, scrape_counter

from taskq.client import Client
from taskq.model import Concurrency

HANDOFFS = "taskq_handoffs_total"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.0, help="demo.sleep this long")
    parser.add_argument("--port", type=int, default=18_700)
    args = parser.parse_args()
    task_type = "demo.sleep" if args.seconds > 0 else "demo.noop"
    payload: dict[str, object] = {"seconds": args.seconds} if args.seconds > 0 else {}

    sandbox = Sandbox(args.port)
    try:
        await sandbox.open()
        sandbox.start_workers(args.workers)
        await sandbox.wait_consumers(args.workers)
        client = await Client.connect(sandbox.settings)
        try:
            work = Work(task_type, payload, args.tasks, args.keys)
            unlimited, unlimited_cpu = await run(sandbox, client, work, "unlimited")
            await limit(client, task_type, Concurrency(args.limit, "customer", "api"))
            limited, limited_cpu = await run(sandbox, client, work, "limited")
        finally:
            await client.close()
        running = await sandbox.db.fetchval(
            "SELECT coalesce(sum(running), 0) FROM taskq.concurrency_slots"
        )
        waiting = await sandbox.db.fetchval(
            "SELECT count(*) FROM taskq.tasks WHERE status = 'WAITING'"
        )
        parked = await sandbox.db.fetchval(
            "SELECT count(*) FROM taskq.task_events WHERE status = 'WAITING'"
        )
        handed = sum(
            sum(scrape_counter(sandbox.metrics_port(n), HANDOFFS, "queue").values())
            for n in range(args.workers)
        )
    finally:
        await sandbox.close()

    print(f"{task_type} {payload}, {args.tasks} tasks, {args.workers} workers")
    figures = {
        "unlimited rate": (unlimited, "tasks/s"),
        f"limited rate ({args.limit} per key, {args.keys} keys)": (limited, "tasks/s"),
        "limited / unlimited": (100 * limited / unlimited, "%"),
        "times a task was parked WAITING (limited run)": (parked, ""),
        "released tasks the freeing worker took at once (handoffs)": (handed, ""),
        "slots still held at the end": (running, ""),
        "tasks still WAITING at the end": (waiting, ""),
    }
    for part in CPU_PARTS:
        figures[f"CPU s per 1,000 tasks, {part}, unlimited"] = (unlimited_cpu[part], "s")
        figures[f"CPU s per 1,000 tasks, {part}, limited"] = (limited_cpu[part], "s")
    for figure, (value, unit) in figures.items():
        print(f"{figure:<60} {value:>10.{3 if unit == 's' else 1}f} {unit}")
    for figure, (value, unit) in figures.items():
        print(json.dumps({"bench": "concurrency", "figure": figure, "value": value, "unit": unit}))


@dataclass(frozen=True)
class Work:
    """What a run enqueues: ``tasks`` of ``type`` over ``keys`` customers."""

    type: str
    payload: dict[str, object]
    tasks: int
    keys: int


async def limit(client: Client, task_type: str, concurrency: Concurrency | None) -> None:
    """Set (or remove) a type's concurrency limit, keeping the rest of its definition."""
    store = client.store
    [found] = [t for t in await store.task_types() if t.name == task_type]
    await store.put_task_type(
        task_type,
        queue=found.queue,
        max_attempts=found.max_attempts,
        timeout_seconds=found.timeout_seconds,
        backoff_json=found.backoff,
        payload_schema_json=found.payload_schema,
        enabled=found.enabled,
        concurrency=concurrency,
    )
    client.types.invalidate()


async def run(
    sandbox: Sandbox, client: Client, work: Work, label: str
) -> tuple[float, dict[str, float]]:
    """Enqueue the work's tasks; return the end-to-end rate, and the CPU seconds per
    1,000 tasks of each of :data:`CPU_PARTS`."""
    tasks = work.tasks
    before = await succeeded(sandbox)
    cpu_before = cpu(sandbox)
    start = time.monotonic()
    for first in range(0, tasks, 500):
        batch = [
            {"type": work.type, "payload": {**work.payload, "customer": f"c{n % work.keys}"}}
            for n in range(first, min(tasks, first + 500))
        ]
        await client.enqueue_many(batch)
    while await succeeded(sandbox) < before + tasks:
        if time.monotonic() - start > 600:
            raise SystemExit(f"{label}: not done after 600 s")
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - start
    used = cpu(sandbox)
    print(f"{label}: {tasks} tasks in {seconds:.2f} s")
    return tasks / seconds, {p: 1000 * (used[p] - cpu_before[p]) / tasks for p in CPU_PARTS}


CPU_PARTS = ("workers", "postgres", "rabbitmq")


def cpu(sandbox: Sandbox) -> dict[str, float]:
    """CPU seconds so far of the workers (summed), Postgres and RabbitMQ."""
    used = cpu_now({f"worker{n}": w.pid for n, w in enumerate(sandbox.workers)})
    used["workers"] = sum(used[f"worker{n}"] for n in range(len(sandbox.workers)))
    return used


async def succeeded(sandbox: Sandbox) -> int:
    count: int = await sandbox.db.fetchval(
        "SELECT count(*) FROM taskq.tasks WHERE status = 'SUCCEEDED'"
    )
    return count


if __name__ == "__main__":
    asyncio.run(main())
