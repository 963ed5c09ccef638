"""Rate-limit accuracy: starts per second of a rate-limited type, from the rows.

Starts K worker processes against a fresh database and namespace, gives
``bench.stamp`` (a handler that returns the time it started) a rate limit of R
per second (as an operator would, through the store: the workers keep an
operator's limit), enqueues R x S tasks at once (S seconds' worth; with
--enqueue-first before the workers start), and reads each task's handler start
once all have run. Prints the starts in each whole second from the first start
(the last, partial second left out), the most in any sliding one-second window
(which the limit bounds at R + 1), the mean rate, the attempts (a wait counts
none), how late handlers started after their recorded start (``started_at``: a
rate-limited task's slot), and the workers' claim decisions (a task is decided
``limited`` once or twice, then held until its slot: none cycles). Prints a
table and JSON lines.

    .venv/bin/python scripts/bench_limits.py [--rate 50] [--seconds 60] [--workers 2]
        [--concurrency N] [--enqueue-first]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta

from bench_handlers import STAMP
from benchlib import Sandbox, enqueue_chunks, percentile

from taskq.client import Client
from taskq.ratelimits import RateLimit
from taskq.store import Store


def most_in_a_window(starts: list[datetime], window: float) -> int:
    """The most starts in any window [t, t + window) that begins at a start."""
    most, j = 0, 0
    for i, start in enumerate(starts):
        while j < len(starts) and starts[j] < start + timedelta(seconds=window):
            j += 1
        most = max(most, j - i)
    return most


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--port", type=int, default=18_700)
    parser.add_argument(
        "--enqueue-first",
        action="store_true",
        help="enqueue the backlog before the workers start (else while they run)",
    )
    args = parser.parse_args()
    count = args.rate * args.seconds

    sandbox = Sandbox(args.port)
    try:
        await sandbox.open()
        store = await Store.connect(sandbox.database_url, min_size=1, max_size=2)
        try:
            await sandbox.db.execute(
                "INSERT INTO taskq.task_type (name, queue) VALUES ($1, 'default')", STAMP
            )
            limit = RateLimit(args.rate, 1.0)
            await store.set_type_rate_limits([(STAMP, limit)], "api")
        finally:
            await store.close()
        if not args.enqueue_first:
            sandbox.start_workers(args.workers, args.concurrency)
            await sandbox.wait_consumers(args.workers)
        client = await Client.connect(sandbox.settings)
        try:
            await enqueue_chunks(client, STAMP, count)
        finally:
            await client.close()
        if args.enqueue_first:
            sandbox.start_workers(args.workers, args.concurrency)
        deadline = asyncio.get_running_loop().time() + args.seconds * 3 + 60
        while True:
            done = await sandbox.db.fetchval(
                "SELECT count(*) FROM taskq.tasks WHERE status = 'SUCCEEDED'"
            )
            if done >= count or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(1.0)
        rows = await sandbox.db.fetch(
            "SELECT started_at, attempts, run_at, created_at, result::text::float8 AS stamp"
            " FROM taskq.tasks WHERE status = 'SUCCEEDED'"
        )
        decisions = sandbox.deliveries()
    finally:
        await sandbox.close()

    # The handlers' own clock (time.time(), as Postgres's clock_timestamp()).
    starts = sorted(datetime.fromtimestamp(row["stamp"], UTC) for row in rows)
    first = starts[0]
    per_second: dict[int, int] = {}
    for start in starts:
        second = int((start - first).total_seconds())
        per_second[second] = per_second.get(second, 0) + 1
    whole = [per_second.get(s, 0) for s in range(int((starts[-1] - first).total_seconds()))]
    # The limiter's own record: started_at (a rate-limited task's slot, which its
    # worker waits for), in whole seconds from the first.
    granted = sorted(row["started_at"] for row in rows)
    granted_second: dict[int, int] = {}
    for start in granted:
        second = int((start - granted[0]).total_seconds())
        granted_second[second] = granted_second.get(second, 0) + 1
    granted_whole = [
        granted_second.get(s, 0) for s in range(int((granted[-1] - granted[0]).total_seconds()))
    ]
    span = (starts[-1] - first).total_seconds()
    low, high = args.rate * 0.9, args.rate * 1.1
    # A task that waited has its slot as started_at: its handler starts after it.
    late = sorted(
        r["stamp"] * 1000 - r["started_at"].timestamp() * 1000
        for r in rows
        if r["run_at"] > r["created_at"]
    ) or [0.0]
    busiest = max(
        range(len(starts)),
        key=lambda i: sum(
            1 for s in starts[i : i + 2 * args.rate] if s < starts[i] + timedelta(seconds=1)
        ),
    )
    figures = {
        "tasks run": (len(rows), ""),
        "tasks enqueued": (count, ""),
        "attempts above 1": (sum(1 for r in rows if r["attempts"] != 1), ""),
        "span from first to last start": (span, "s"),
        "mean starts per second": ((len(starts) - 1) / span if span else 0.0, "/s"),
        "whole seconds counted": (len(whole), ""),
        "fewest starts in a whole second": (min(whole), ""),
        "most starts in a whole second": (max(whole), ""),
        f"seconds outside {low:g}-{high:g}": (sum(1 for n in whole if not low <= n <= high), ""),
        "most starts in any sliding second": (most_in_a_window(starts, 1.0), ""),
        "started_at: fewest in a whole second": (min(granted_whole), ""),
        "started_at: most in a whole second": (max(granted_whole), ""),
        "started_at: most in any sliding second": (most_in_a_window(granted, 1.0), ""),
        "handler start after its slot p50": (percentile(late, 0.5), "ms"),
        "handler start after its slot p99": (percentile(late, 0.99), "ms"),
        "handler start after its slot max": (late[-1], "ms"),
        "busiest sliding second begins after the first start": (
            (starts[busiest] - first).total_seconds(),
            "s",
        ),
        "claim decisions: claimed": (decisions.get("claimed", 0.0), ""),
        "claim decisions: limited": (decisions.get("limited", 0.0), ""),
        "claim decisions: early": (decisions.get("early", 0.0), ""),
    }
    print(f"handler starts per whole second: {whole}")
    print(f"started_at per whole second: {granted_whole}")
    for figure, (value, unit) in figures.items():
        print(f"{figure:<50} {value:>10.2f} {unit}")
    for figure, (value, unit) in figures.items():
        print(json.dumps({"bench": "limits", "figure": figure, "value": value, "unit": unit}))


if __name__ == "__main__":
    asyncio.run(main())
