"""Workloads 4 and 5 of `scripts/bench`, the paced ones: start latency at one task
per 20 ms, step by step, and the accuracy of retry delays.

A task's way to its handler, with where each boundary comes from. Every clock
is the machine's wall clock (CLOCK_REALTIME): the benchmark's ``time.time()``,
Postgres's ``now()`` and ``clock_timestamp()``, the handler's ``time.time()``.
So the steps hold only with Postgres on the benchmark's machine (the default).

- sent: the benchmark, just before it writes ``POST /enqueue``.
- created: ``tasks.created_at``, ``now()`` of the insert's transaction: when
  the API's insert statement began (after HTTP parsing, validation and the
  wait for an insert flusher).
- inserted: ``task_events.at`` of the ENQUEUED event, ``clock_timestamp()`` in
  the insert's statement trigger: the row is written, not yet committed.
- answered: the benchmark, once it has read the 201. The API answers after the
  commit, so this bounds the commit from above.
- insert commit: ``pg_xact_commit_timestamp`` of the ENQUEUED event's
  transaction, where the server keeps commit times (``track_commit_timestamp =
  on``; off by default); "answered" stands in for it otherwise.
- claim: ``tasks.started_at``, ``now()`` of the worker's claim statement. Before
  it, the API's outbox published the envelope (concurrently with the answer),
  RabbitMQ routed and delivered it, the consumer passed it to a claim batch.
  Nothing records when the envelope was written, confirmed or delivered, so
  "publish, confirm and delivery" is one step (and the confirm, travelling back
  to the API while the envelope travels on, is on no task's way to its handler).
- claimed: ``task_events.at`` of the RUNNING event, ``clock_timestamp()`` in the
  claim's statement trigger, before its commit.
- claim commit: the commit time of the RUNNING event's transaction, where the
  server keeps them; "claimed" stands in for it otherwise (so the claim's
  commit then falls in the last step).
- begin (means only): the worker's ``taskq_task_queue_wait_seconds`` histogram,
  observed as ``now - created_at`` when the worker starts the handler's asyncio
  task after the claim committed. Its sum and count over the workload give the
  mean of begin - created, not each task's.
- handler: the result of ``bench.stamp`` (scripts/bench_handlers.py), the
  handler's own ``time.time()`` when it starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from statistics import fmean
from typing import Any

from bench_handlers import STAMP
from benchlib import HttpConnection, Sandbox, percentile

from taskq.worker.worker import TYPES_REFRESH_SECONDS

INTERVAL = 0.02

# Each task's boundaries as epoch seconds (float8 keeps microseconds at this magnitude);
# $2: whether the server keeps commit times (else they are NULL).
BOUNDARIES = """
SELECT t.id::text AS id,
       extract(epoch FROM t.created_at)::float8 AS created,
       extract(epoch FROM e.at)::float8 AS inserted,
       CASE WHEN $2 THEN extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8
       END AS insert_commit,
       extract(epoch FROM t.started_at)::float8 AS claim,
       extract(epoch FROM r.at)::float8 AS claimed,
       CASE WHEN $2 THEN extract(epoch FROM pg_xact_commit_timestamp(r.xmin))::float8
       END AS claim_commit,
       (t.result #>> '{}')::float8 AS handler
FROM taskq.tasks t
JOIN taskq.task_events e ON e.task_id = t.id AND e.status = 'ENQUEUED' AND e.previous_status IS NULL
JOIN taskq.task_events r ON r.task_id = t.id AND r.status = 'RUNNING' AND r.attempt = 1
WHERE t.id = ANY($1::uuid[]) AND t.status = 'SUCCEEDED'
"""

Step = tuple[str, Callable[[dict[str, float]], float]]


def steps(tracked: bool) -> list[Step]:
    """The steps on a task's way to its handler; the first is the whole way, indented
    ones split the step above them. ``tracked``: the server keeps commit times."""
    committed = "insert commit" if tracked else "201 read"
    commit = "commit" if tracked else "commit, answer"
    claimed = "claim commit" if tracked else "RUNNING event"
    claim = "claim and commit" if tracked else "claim statement"
    start = "handler start" if tracked else "claim commit, handler start"
    return [
        ("POST sent -> handler start", lambda t: t["handler"] - t["sent"]),
        (f"1 insert and commit: sent -> {committed}", lambda t: t["committed"] - t["sent"]),
        ("    HTTP, validation, flusher: sent -> created_at", lambda t: t["created"] - t["sent"]),
        ("    insert: created_at -> ENQUEUED event", lambda t: t["inserted"] - t["created"]),
        (f"    {commit}: ENQUEUED event -> {committed}", lambda t: t["committed"] - t["inserted"]),
        (f"2 publish, confirm, delivery: {committed} -> started_at",
         lambda t: t["claim"] - t["committed"]),
        (f"3 {claim}: started_at -> {claimed}", lambda t: t["claim_committed"] - t["claim"]),
        (f"4 {start}: {claimed} -> handler", lambda t: t["handler"] - t["claim_committed"]),
    ]  # fmt: skip


async def enqueue_paced(
    port: int, count: int, interval: float, task: dict[str, Any]
) -> list[tuple[str, float, float]]:
    """POST /enqueue ``count`` times, one every ``interval`` seconds: each task's id,
    and the wall-clock times its request was sent and its answer read."""
    conn = HttpConnection("127.0.0.1", port)
    await conn.open()
    sent = []
    body = json.dumps(task).encode()
    first = time.perf_counter()
    for n in range(count):
        await asyncio.sleep(max(0.0, first + n * interval - time.perf_counter()))
        before = time.time()
        status, answer = await conn.post("/enqueue", body)
        after = time.time()
        if status != 201:
            raise RuntimeError(f"POST /enqueue answered {status}: {answer!r}")
        sent.append((json.loads(answer)["id"], before, after))
    conn.close()
    return sent


async def boundaries(
    sandbox: Sandbox, sent: list[tuple[str, float, float]], tracked: bool
) -> list[dict[str, float]]:
    """Each task's boundaries, once every task's handler has run (30 s at most)."""
    ids = [task_id for task_id, _, _ in sent]
    deadline = time.monotonic() + 30
    while len(rows := await sandbox.db.fetch(BOUNDARIES, ids, tracked)) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {len(ids)} {STAMP} tasks ran within 30 s")
        await asyncio.sleep(0.1)
    times = {task_id: (before, after) for task_id, before, after in sent}
    tasks = []
    for row in rows:
        task = {**dict(row), "sent": times[row["id"]][0], "answered": times[row["id"]][1]}
        task["committed"] = task["insert_commit"] if tracked else task["answered"]
        task["claim_committed"] = task["claim_commit"] if tracked else task["claimed"]
        tasks.append(task)
    return tasks


async def start_latency(sandbox: Sandbox, port: int, count: int) -> list[tuple[str, float, str]]:
    """Run the workload on the running workers: figures as (name, milliseconds, target)."""
    wait_before = await asyncio.to_thread(sandbox.queue_wait)
    tracked = await sandbox.db.fetchval("SELECT current_setting('track_commit_timestamp')::bool")
    sent = await enqueue_paced(port, count, INTERVAL, {"type": STAMP, "payload": {}})
    tasks = await boundaries(sandbox, sent, tracked)
    wait_after = await asyncio.to_thread(sandbox.queue_wait)
    figures: list[tuple[str, float, str]] = []
    # As measured before the breakdown (the claim's start, not the handler's, and from
    # the insert, not the request): kept so that figures of earlier runs compare.
    lags = [t["claim"] - t["created"] for t in tasks]
    label = f"enqueue -> start, 1 task / 20 ms ({len(lags)})"
    figures.append((label + " p50", percentile(lags, 0.5) * 1000, "<= 5"))
    figures.append((label + " p99", percentile(lags, 0.99) * 1000, "<= 15"))
    for n, (name, step) in enumerate(steps(tracked)):
        values = [step(t) for t in tasks]
        target = "<= Dramatiq's" if n == 0 else ""
        figures.append((f"{name} p50", percentile(values, 0.5) * 1000, target))
        figures.append((f"{name} p99", percentile(values, 0.99) * 1000, target))
    # The last step split at the worker's begin, in means: the histogram has no
    # per-task values.
    waits = wait_after[1] - wait_before[1]
    if waits:
        begin = (wait_after[0] - wait_before[0]) / waits  # mean of begin - created
        claimed = fmean(t["claim_committed"] - t["created"] for t in tasks)
        handler = fmean(t["handler"] - t["created"] for t in tasks)
        to_begin, from_begin = begin - claimed, handler - begin
    else:
        to_begin = from_begin = float("nan")
    last = "claim commit" if tracked else "RUNNING event"
    figures.append((f"    {last} -> worker's begin, mean", to_begin * 1000, ""))
    figures.append(("    worker's begin -> handler, mean", from_begin * 1000, ""))
    return figures


async def put_backoff(port: int, delay: float) -> float:
    """Give ``demo.fail`` a fixed backoff of ``delay`` seconds; when (monotonic) that was."""
    conn = HttpConnection("127.0.0.1", port)
    await conn.open()
    body = {"backoff": {"strategy": "fixed", "delay": delay}}
    status, answer = await conn.request("PUT", "/types/demo.fail", json.dumps(body).encode())
    conn.close()
    if status not in (200, 201):
        raise RuntimeError(f"PUT /types/demo.fail answered {status}: {answer!r}")
    return time.monotonic()


async def retry_accuracy(
    sandbox: Sandbox, port: int, count: int, delay: float, put_at: float
) -> list[tuple[str, float, str, str]]:
    """``count`` tasks that fail once, retried after ``delay`` (the backoff put at
    ``put_at``): how late each retry started. Figures as (name, value, unit, target)."""
    # Workers re-read task types every TYPES_REFRESH_SECONDS: wait until they have.
    await asyncio.sleep(max(0.0, put_at + TYPES_REFRESH_SECONDS + 0.5 - time.monotonic()))
    task = {"type": "demo.fail", "payload": {"times": 1}}
    ids = [task_id for task_id, _, _ in await enqueue_paced(port, count, 0.05, task)]
    deadline = time.monotonic() + delay + 60
    sql = "SELECT count(*) FROM taskq.tasks WHERE id = ANY($1::uuid[]) AND status = 'SUCCEEDED'"
    while await sandbox.db.fetchval(sql, ids) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"retried tasks not SUCCEEDED {delay + 60:g}s after")
        await asyncio.sleep(0.1)
    rows = await sandbox.db.fetch(
        """
        SELECT extract(epoch FROM e.run_at - e.at) AS asked,
               extract(epoch FROM (SELECT min(r.at) FROM taskq.task_events r
                                   WHERE r.task_id = e.task_id AND r.id > e.id
                                     AND r.status = 'RUNNING') - e.at) AS gap
        FROM taskq.task_events e
        WHERE e.task_id = ANY($1::uuid[])
          AND e.previous_status = 'RUNNING' AND e.status = 'ENQUEUED'
        """,
        ids,
    )
    errors = [float(row["gap"]) - delay for row in rows]
    asked = [float(row["asked"]) for row in rows]
    label = f"retry after {delay:g} s ({len(rows)} tasks): error"
    return [
        (label + " min", min(errors), "s", ">= 0"),
        (label + " p50", percentile(errors, 0.5), "s", ""),
        (label + " max", max(errors), "s", "<= +1.5"),
        (f"retry after {delay:g} s: run_at - failure as asked, median",
         percentile(asked, 0.5), "s", ""),
    ]  # fmt: skip
