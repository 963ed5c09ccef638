"""The cost of growth (issue #19): the same measurements with 0, 1 million and 10
million retained rows of history.

Against a fresh database and namespace (``benchlib.Sandbox``), for each level of
retained rows in ``--rows`` (cumulative; default ``0,1000000,10000000``):

1. **Preload** finished tasks up to the level, fast: one ``INSERT … SELECT`` from
   ``generate_series`` per 250,000 rows (time-ordered ids, as taskq's UUIDv7 are;
   99 % SUCCEEDED, 1 % FAILED, finished over the last day, so that retention keeps
   them), with three history rows each (ENQUEUED, RUNNING, the end), then
   ``VACUUM ANALYZE``. The session inserts with ``session_replication_role =
   replica`` (no triggers: the history rows are written by the same statement's
   next step, as the triggers would have).
2. **Single enqueue**: ``--enqueues`` sequential ``POST /enqueue`` on one keep-alive
   connection: p50 and p99 in ms.
3. **Claim statement**: ``EXPLAIN ANALYZE`` of the ``claim`` statement for 100
   fresh ENQUEUED tasks, in a transaction rolled back, five times: the median
   execution time in ms.
4. **Listings**: ``GET /tasks`` (the first page, newest first) and ``GET
   /tasks?status=FAILED``, 10 each: median and worst in ms; ``GET /stats`` five
   times 1.1 s apart (the API serves a computed snapshot for a second): median.
5. **End to end**: ``--workers`` workers at taskq's defaults run ``--tasks``
   ``demo.noop`` enqueued with ``Client.enqueue_many`` (batches of 500): tasks per
   second from the first enqueue to the last success.

Prints a table and JSON lines; the last column is each figure's ratio of the
largest level to none (the goal: flat within 15 %).

    .venv/bin/python scripts/bench_cost_curve.py [--rows 0,1000000,10000000]
        [--tasks 5000] [--workers 2] [--enqueues 300] [--port 18900]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import taskq.sql as sql
from benchlib import HttpConnection, Sandbox, percentile

from taskq.client import Client

PRELOAD_CHUNK = 250_000

# Finished tasks with time-ordered ids (the first 48 bits the creation's Unix time in
# ms, as UUIDv7), created over the day before now; ``$1`` rows from offset ``$2``.
PRELOAD_TASKS = """
INSERT INTO taskq.tasks (id, type, queue, payload, status, attempts, max_attempts,
                         result, last_error, timeout_seconds, run_at, published_at,
                         created_at, updated_at, started_at, finished_at)
SELECT (lpad(to_hex((extract(epoch FROM c.at) * 1000)::bigint), 12, '0')
        || '7' || substr(md5(n::text), 1, 3) || '8' || substr(md5(n::text), 4, 15))::uuid,
       'demo.noop', 'default', '{}'::jsonb,
       CASE WHEN n % 100 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END, 1, 1,
       CASE WHEN n % 100 = 0 THEN NULL ELSE 'null'::jsonb END,
       CASE WHEN n % 100 = 0 THEN 'RuntimeError: preloaded' END,
       30, c.at, c.at, c.at, c.at + interval '20 ms', c.at + interval '10 ms',
       c.at + interval '20 ms'
FROM generate_series($2::bigint + 1, $2::bigint + $1::bigint) AS n
CROSS JOIN LATERAL (
    SELECT now() - interval '1 day' + make_interval(secs => (n % 86000000) / 1000.0) AS at
) c
RETURNING id, status, created_at
"""

PRELOAD_EVENTS = """
INSERT INTO taskq.task_events (task_id, status, previous_status, attempt, worker_id, at)
SELECT t.id, e.status, e.previous, e.attempt, e.worker, t.created_at + e.after
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS t(id, status, created_at)
CROSS JOIN LATERAL (VALUES
    ('ENQUEUED', NULL, 0, NULL, interval '0'),
    ('RUNNING', 'ENQUEUED', 1, 'preload', interval '10 ms'),
    (t.status, 'RUNNING', 1, 'preload', interval '20 ms')
) AS e(status, previous, attempt, worker, after)
"""


async def preload(sandbox: Sandbox, have: int, want: int) -> float:
    """Insert finished tasks and their history from ``have`` rows up to ``want``;
    returns the seconds it took (the VACUUM ANALYZE included)."""
    began = time.monotonic()
    db = sandbox.db
    await db.execute("SET session_replication_role = replica")
    try:
        while have < want:
            n = min(PRELOAD_CHUNK, want - have)
            async with db.transaction():
                rows = await db.fetch(PRELOAD_TASKS, n, have)
                await db.execute(
                    PRELOAD_EVENTS,
                    [r["id"] for r in rows],
                    [r["status"] for r in rows],
                    [r["created_at"] for r in rows],
                )
            have += n
    finally:
        await db.execute("SET session_replication_role = origin")
    await db.execute("VACUUM ANALYZE taskq.tasks")
    await db.execute("VACUUM ANALYZE taskq.task_events")
    return time.monotonic() - began


async def single_enqueues(port: int, count: int) -> list[float]:
    connection = HttpConnection("127.0.0.1", port)
    await connection.open()
    body = json.dumps({"type": "demo.noop", "payload": {}}).encode()
    took = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            status, answer = await connection.post("/enqueue", body)
            took.append((time.perf_counter() - began) * 1000)
            if status not in (200, 201):
                raise RuntimeError(f"POST /enqueue answered {status}: {answer[:200]!r}")
    finally:
        connection.close()
    return took


async def claim_ms(sandbox: Sandbox, client: Client) -> float:
    """The ``claim`` statement's execution time for 100 fresh tasks (median of 5),
    each time rolled back."""
    ids = [r.id for r in await client.enqueue_many("demo.noop", [{}] * 100)]
    statement = "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.queries()["claim"]
    times = []
    for _ in range(5):
        transaction = sandbox.db.transaction()
        await transaction.start()
        try:
            plan = json.loads(await sandbox.db.fetchval(statement, sorted(ids), "bench", 30.0))
        finally:
            await transaction.rollback()
        times.append(plan[0]["Execution Time"])
    return statistics.median(times)


async def gets(port: int, path: str, count: int = 10, pause: float = 0.0) -> list[float]:
    """``count`` sequential GETs of ``path``, ``pause`` seconds apart: their times in ms."""
    connection = HttpConnection("127.0.0.1", port)
    await connection.open()
    took = []
    try:
        for _ in range(count):
            await asyncio.sleep(pause)
            began = time.perf_counter()
            status, answer = await connection.request("GET", path, b"")
            took.append((time.perf_counter() - began) * 1000)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {answer[:200]!r}")
    finally:
        connection.close()
    return took


async def end_to_end(sandbox: Sandbox, client: Client, tasks: int, workers: int) -> float:
    sandbox.start_workers(workers)
    try:
        await sandbox.wait_consumers(workers)
        began = time.monotonic()
        ids: list[uuid.UUID] = []
        for start in range(0, tasks, 500):
            payloads = [{}] * min(500, tasks - start)
            ids += [r.id for r in await client.enqueue_many("demo.noop", payloads)]
        last = max(ids)
        while True:
            done = await sandbox.db.fetchval(
                "SELECT count(*) FROM taskq.tasks WHERE id = ANY($1) AND status = 'SUCCEEDED'",
                ids,
            )
            if done == len(ids):
                break
            if time.monotonic() - began > 600:
                raise RuntimeError(f"end to end: {done} of {len(ids)} done after 600 s ({last})")
            await asyncio.sleep(0.05)
        return len(ids) / (time.monotonic() - began)
    finally:
        sandbox.stop_workers()


async def measure(sandbox: Sandbox, args: argparse.Namespace) -> dict[str, float]:
    client = await Client.connect(sandbox.settings)
    try:
        enqueues = await single_enqueues(sandbox.port, args.enqueues)
        figures = {
            "single enqueue p50 (ms)": percentile(enqueues, 0.50),
            "single enqueue p99 (ms)": percentile(enqueues, 0.99),
            "claim statement, 100 tasks (ms)": await claim_ms(sandbox, client),
        }
        for label, path in (
            ("GET /tasks", "/tasks"),
            ("GET /tasks?status=FAILED", "/tasks?status=FAILED"),
        ):
            took = await gets(sandbox.port, path)
            figures[f"{label} median (ms)"] = statistics.median(took)
            figures[f"{label} worst (ms)"] = max(took)
        # The API computes /stats at most once a second (STATS_MAX_AGE) and serves
        # that in between: a request past the second is a computation.
        took = await gets(sandbox.port, "/stats", count=5, pause=1.1)
        figures["GET /stats, computed, median (ms)"] = statistics.median(took)
        figures["end to end (tasks/s)"] = await end_to_end(
            sandbox, client, args.tasks, args.workers
        )
    finally:
        await client.close()
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="0,1000000,10000000")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--enqueues", type=int, default=300)
    parser.add_argument("--port", type=int, default=18_900)
    args = parser.parse_args()
    levels = [int(level) for level in args.rows.split(",")]
    if levels != sorted(levels) or levels[0] < 0:
        parser.error("--rows: levels from low to high, none negative")

    results: dict[int, dict[str, float]] = {}
    sandbox = Sandbox(args.port)
    try:
        await sandbox.open()
        await sandbox.start_api()
        have = 0
        for level in levels:
            seconds = await preload(sandbox, have, level)
            have = level
            rows = await sandbox.db.fetchval("SELECT count(*) FROM taskq.tasks")
            print(f"{level:,} retained rows preloaded in {seconds:.0f} s ({rows:,} tasks now)")
            results[level] = await measure(sandbox, args)
            size = await sandbox.db.fetchval(
                "SELECT pg_total_relation_size('taskq.tasks')"
                " + pg_total_relation_size('taskq.task_events')"
            )
            results[level]["tasks and history on disk (MB)"] = size / 1e6
    finally:
        await sandbox.close()
    report(results)


def report(results: dict[int, dict[str, float]]) -> None:
    levels = list(results)
    names = list(results[levels[0]])
    header = ["figure", *(f"{level:,} rows" for level in levels), "largest / none"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for name in names:
        values = [results[level][name] for level in levels]
        ratio = values[-1] / values[0] if values[0] else float("nan")
        cells = [f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in values]
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    for level in levels:
        for name, value in results[level].items():
            line: dict[str, Any] = {"bench": "cost_curve", "rows": level, "figure": name}
            print(json.dumps({**line, "value": value}))


if __name__ == "__main__":
    asyncio.run(main())
