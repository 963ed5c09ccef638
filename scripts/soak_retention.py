"""The retention soak (issue #19): does retention keep up at full rate?

Against a fresh database and namespace (``benchlib.Sandbox``), ``--workers``
workers run ``demo.noop`` as fast as they can for ``--minutes``, with
``TASKQ_RETENTION`` set to ``--retention`` seconds (and
``TASKQ_HISTORY_PARTITION`` to ``--history-partition``, so that partitions of the
history are dropped within the run). A feeder in this process keeps
``--backlog`` tasks ahead of them (``Client.enqueue_many``, 500 a call), so the
workers never wait for work and the queue never grows without bound.

Every ``--sample`` seconds it records the tasks finished, the sizes of ``tasks``
and ``task_events`` (heap and indexes), their live and dead tuples and autovacuum
runs (``pg_stat_user_tables``), the sweeper's ``taskq_retention_deleted_total``,
and how many finished tasks are *overdue*: finished longer ago than the retention
plus the sweeper's rest between passes (:func:`taskq.fleet.sweeper.retention_rest`)
plus ``--grace`` seconds, which a retention that keeps up leaves at none.

Autovacuum is the other half of retention: deleted rows are dead tuples until a
vacuum frees their space. The script reads the server's ``autovacuum`` setting
and says when it is off (this machine's shared Postgres runs with it off, as CI's
``conf.d/90-ci.conf`` sets). ``--private-postgres`` runs the soak on a Postgres
cluster of its own instead, started from the installed binaries on a free port
with the server's defaults (autovacuum on) and ``fsync = on``, then removed.

Prints a table per window and a verdict: throughput of the first window against
the last (goal: within 10 %), the largest total size in the last third of the run
against the largest in the middle third (a plateau: within 10 %), dead tuples and
autovacuum runs, and the overdue count. The last line is JSON, for
``tests/faults/test_soak_retention.py`` (the short mode CI runs) and for the docs.

    .venv/bin/python scripts/soak_retention.py [--minutes 30] [--retention 120]
        [--workers 2] [--concurrency N] [--backlog 20000] [--sample 10] [--port 18950]
        [--history-partition 60] [--private-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib import SCRIPTS, SERVER_URL, Sandbox

from taskq.client import Client
from taskq.fleet.sweeper import retention_rest

CHUNK = 500

# The history's summed over its partitions (migration 0021).
SIZES = """
WITH tables AS (
    SELECT 'tasks' AS name, 'taskq.tasks'::regclass AS relid
    UNION ALL
    SELECT 'task_events', relid FROM pg_partition_tree('taskq.task_events') WHERE isleaf
)
SELECT t.name AS relname,
       sum(pg_relation_size(t.relid))::bigint AS heap,
       sum(pg_indexes_size(t.relid))::bigint AS indexes,
       sum(pg_total_relation_size(t.relid))::bigint AS total,
       sum(s.n_live_tup)::bigint AS n_live_tup, sum(s.n_dead_tup)::bigint AS n_dead_tup,
       sum(s.autovacuum_count)::bigint AS autovacuum_count, count(*) AS partitions
FROM tables t JOIN pg_stat_user_tables s ON s.relid = t.relid
GROUP BY t.name
"""

OVERDUE = """
SELECT count(*) FROM taskq.tasks
WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
  AND finished_at < now() - make_interval(secs => $1)
"""


@dataclass
class Sample:
    at: float  # seconds since the start
    finished: float  # tasks finished so far
    tasks_mb: float
    tasks_index_mb: float
    events_mb: float
    events_index_mb: float
    total_mb: float
    tasks_live: int
    tasks_dead: int
    events_live: int
    events_dead: int
    autovacuums: int  # of both tables, so far
    partitions: int  # of the history
    deleted: float  # by retention, so far
    overdue: int


@contextlib.contextmanager
def private_postgres() -> Iterator[str]:
    """A Postgres cluster of the soak's own, with the server's defaults (autovacuum on)
    and fsync on; yields its maintenance database's URL."""
    sys.path.insert(0, str(SCRIPTS.parent))  # the repository's root, for tests.support
    from tests.support.private_services import PrivatePostgres, _postgres_bindir

    bindir = _postgres_bindir()
    if bindir is None:
        raise SystemExit("--private-postgres: no initdb and pg_ctl installed")
    server = PrivatePostgres(bindir, Path(tempfile.mkdtemp(prefix="taskq-soak-pg-")))
    try:
        server.init()
        with (server.data / "postgresql.conf").open("a") as conf:
            # After the test cluster's lines, so these win: durable, production-like.
            conf.write("fsync = on\nshared_buffers = 128MB\nautovacuum = on\n")
        server.start()
        yield server.server_url
    finally:
        server.destroy()


def scrape(port: int, name: str) -> float:
    """The sum of every sample of ``name`` on a worker's /metrics (0 when it has none)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    pattern = re.compile(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


class Soak:
    def __init__(self, sandbox: Sandbox, args: argparse.Namespace) -> None:
        self.sandbox = sandbox
        self.args = args
        self.autovacuum = "unknown"
        self.enqueued = 0
        self.finished = 0.0
        self.done = False
        self.samples: list[Sample] = []
        self.overdue_after = args.retention + retention_rest(args.retention) + args.grace

    def workers_total(self, name: str) -> float:
        ports = [self.sandbox.metrics_port(n) for n in range(len(self.sandbox.workers))]
        return sum(scrape(port, name) for port in ports)

    async def progress(self) -> None:
        while not self.done:
            self.finished = await asyncio.to_thread(
                self.workers_total, "taskq_tasks_processed_total"
            )
            await asyncio.sleep(0.5)

    async def feed(self, client: Client) -> None:
        while not self.done:
            if self.enqueued - self.finished > self.args.backlog:
                await asyncio.sleep(0.05)
                continue
            self.enqueued += CHUNK
            await client.enqueue_many("demo.noop", [{}] * CHUNK)

    async def sample(self, began: float) -> Sample:
        rows = {r["relname"]: r for r in await self.sandbox.db.fetch(SIZES)}
        tasks, events = rows["tasks"], rows["task_events"]
        deleted = await asyncio.to_thread(self.workers_total, "taskq_retention_deleted_total")
        overdue = await self.sandbox.db.fetchval(OVERDUE, self.overdue_after)
        mb = 1e6
        return Sample(
            at=time.monotonic() - began,
            finished=self.finished,
            tasks_mb=tasks["heap"] / mb,
            tasks_index_mb=tasks["indexes"] / mb,
            events_mb=events["heap"] / mb,
            events_index_mb=events["indexes"] / mb,
            total_mb=(tasks["total"] + events["total"]) / mb,
            tasks_live=tasks["n_live_tup"],
            tasks_dead=tasks["n_dead_tup"],
            events_live=events["n_live_tup"],
            events_dead=events["n_dead_tup"],
            autovacuums=tasks["autovacuum_count"] + events["autovacuum_count"],
            partitions=events["partitions"],
            deleted=deleted,
            overdue=overdue,
        )

    async def run(self) -> None:
        self.sandbox.env["TASKQ_RETENTION"] = str(self.args.retention)
        if self.args.history_partition is not None:
            self.sandbox.env["TASKQ_HISTORY_PARTITION"] = str(self.args.history_partition)
        self.sandbox.start_workers(self.args.workers, self.args.concurrency)
        await self.sandbox.wait_consumers(self.args.workers)
        self.autovacuum = await self.sandbox.db.fetchval("SHOW autovacuum")
        if self.autovacuum != "on":
            print(
                "autovacuum is off on this server: dead tuples stay until a vacuum"
                " (--private-postgres runs the soak with it on)",
                flush=True,
            )
        client = await Client.connect(self.sandbox.settings)
        began = time.monotonic()
        background = [
            asyncio.create_task(self.progress()),
            *(asyncio.create_task(self.feed(client)) for _ in range(4)),
        ]
        try:
            self.samples.append(await self.sample(began))
            end = began + self.args.minutes * 60
            while time.monotonic() < end:
                await asyncio.sleep(min(self.args.sample, max(0.0, end - time.monotonic())))
                self.samples.append(await self.sample(began))
                for task in background:
                    if task.done():
                        task.result()  # a feeder's or the progress's failure ends the soak
                last = self.samples[-1]
                print(
                    f"{last.at:7.0f} s  {last.finished:>10,.0f} finished"
                    f"  {last.total_mb:8.1f} MB  dead {last.tasks_dead + last.events_dead:>9,}"
                    f"  deleted {last.deleted:>10,.0f}  overdue {last.overdue:>7,}"
                    f"  partitions {last.partitions}",
                    flush=True,
                )
        finally:
            self.done = True
            await asyncio.gather(*background, return_exceptions=True)
            await client.close()


def rate(samples: list[Sample], start: float, end: float) -> float:
    """Tasks finished per second between the samples nearest ``start`` and ``end``."""
    first = min(samples, key=lambda s: abs(s.at - start))
    last = min(samples, key=lambda s: abs(s.at - end))
    return (last.finished - first.finished) / max(1e-9, last.at - first.at)


def verdict(samples: list[Sample], minutes: float, autovacuum: str) -> dict[str, Any]:
    length = samples[-1].at
    window = min(300.0, length / 3)
    first_rate = rate(samples, 0.0, window)
    last_rate = rate(samples, length - window, length)
    middle = [s.total_mb for s in samples if length / 3 <= s.at < 2 * length / 3]
    last_third = [s.total_mb for s in samples if s.at >= 2 * length / 3]
    end = samples[-1]
    return {
        "minutes": minutes,
        "window_s": round(window, 1),
        "first_rate": round(first_rate, 1),
        "last_rate": round(last_rate, 1),
        "drift": round(last_rate / first_rate - 1, 4) if first_rate else None,
        "middle_max_mb": round(max(middle), 1) if middle else None,
        "last_max_mb": round(max(last_third), 1) if last_third else None,
        "growth": round(max(last_third) / max(middle) - 1, 4) if middle and last_third else None,
        "finished": end.finished,
        "deleted": end.deleted,
        "overdue": end.overdue,
        "tasks_live": end.tasks_live,
        "dead_ratio": round(
            (end.tasks_dead + end.events_dead)
            / max(1, end.tasks_live + end.events_live + end.tasks_dead + end.events_dead),
            4,
        ),
        "autovacuums": end.autovacuums - samples[0].autovacuums,
        "autovacuum": autovacuum,
    }


def report(samples: list[Sample], result: dict[str, Any], every: float) -> None:
    print()
    print(
        "| at (s) | tasks/s | tasks heap + index (MB) | events heap + index (MB)"
        " | total (MB) | dead tuples | autovacuums | deleted | overdue | history partitions |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    step = max(1, round(every / max(1e-9, samples[1].at - samples[0].at)))
    shown = samples[::step]
    if shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    for before, s in itertools.pairwise(shown):
        per_second = (s.finished - before.finished) / max(1e-9, s.at - before.at)
        print(
            f"| {s.at:.0f} | {per_second:,.0f} | {s.tasks_mb:.1f} + {s.tasks_index_mb:.1f}"
            f" | {s.events_mb:.1f} + {s.events_index_mb:.1f} | {s.total_mb:.1f}"
            f" | {s.tasks_dead + s.events_dead:,} | {s.autovacuums} | {s.deleted:,.0f}"
            f" | {s.overdue:,} | {s.partitions} |"
        )
    print()
    print(
        f"throughput: {result['first_rate']:,.0f} tasks/s in the first {result['window_s']:.0f} s,"
        f" {result['last_rate']:,.0f} in the last (drift {100 * (result['drift'] or 0):+.1f} %,"
        " goal within 10 %)"
    )
    if result["growth"] is not None:
        print(
            f"size: at most {result['middle_max_mb']:,.1f} MB in the middle third,"
            f" {result['last_max_mb']:,.1f} MB in the last"
            f" ({100 * result['growth']:+.1f} %, a plateau within 10 %)"
        )
    print(
        f"retention: {result['deleted']:,.0f} of {result['finished']:,.0f} finished tasks"
        f" deleted, {result['overdue']:,} overdue at the end; dead tuples"
        f" {100 * result['dead_ratio']:.1f} % of both tables; {result['autovacuums']}"
        f" autovacuum runs (autovacuum {result['autovacuum']})"
    )
    print(json.dumps({"soak": result, "samples": [asdict(s) for s in samples]}))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--retention", type=float, default=120.0, help="seconds")
    parser.add_argument(
        "--history-partition", type=float, default=None, help="seconds (default: taskq's)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=None, help="default: taskq's")
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds")
    parser.add_argument("--table-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--port", type=int, default=18_950)
    parser.add_argument("--private-postgres", action="store_true")
    args = parser.parse_args()
    if args.minutes <= 0 or args.retention <= 0 or args.sample <= 0:
        parser.error("--minutes, --retention and --sample must be positive")

    with contextlib.ExitStack() as stack:
        server_url = SERVER_URL
        if args.private_postgres:
            server_url = stack.enter_context(private_postgres())
        sandbox = Sandbox(args.port, server_url=server_url)
        if args.history_partition is not None:
            sandbox.history_partition = args.history_partition
        soak = Soak(sandbox, args)
        try:
            await sandbox.open()
            await soak.run()
        finally:
            await sandbox.close()
    result = verdict(soak.samples, args.minutes, soak.autovacuum)
    report(soak.samples, result, args.table_every)


if __name__ == "__main__":
    asyncio.run(main())
