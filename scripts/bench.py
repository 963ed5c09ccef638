"""The taskq benchmark of issues #5, #14 and #16: enqueue (beside a bare-ASGI app on the
same HTTP stack), end to end (async and sync handlers, tuned and at taskq's
defaults) and backlog drain, start latency step by step, retry-delay accuracy,
how soon ``Client.wait`` returns after a task ends (issue #16) and peak RSS,
optionally against Celery and Dramatiq (tuned and at their defaults).

Starts the API and K workers itself against a fresh database and namespace on
the local Postgres and RabbitMQ, stops everything and cleans up, then prints a
table and one JSON line per figure.

    scripts/bench [--quick] [--runs N] [--workers K] [--concurrency N] [--peer celery]
                  [--peer dramatiq] [--profile DIR] [--pgbouncer]
    scripts/bench --workflows [--quick] [--peer celery] [--fan-out N] [--chain M]

``--workflows`` runs issue #18's workloads instead (scripts/bench_workflows.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
from bench_enqueue import enqueue_workloads
from bench_latency import put_backoff, retry_accuracy, start_latency
from bench_report import Figure, report
from bench_wait import wait_latency
from bench_workflows import add_arguments as add_workflow_arguments
from bench_workflows import run_workflows
from benchlib import AMQP_URL, Sandbox, enqueue_chunks, peak_rss_mb

from taskq.client import Client

SUCCEEDED = "SELECT count(*) FROM taskq.tasks WHERE status = 'SUCCEEDED'"
# Issue #14's goals for taskq's tuned end-to-end rate over each peer's.
E2E_TARGETS = {"celery": ">= 3", "celery+pg": ">= 12", "dramatiq": ">= 2"}
# The sync no-op handler (a plain def run in the worker's thread pool), where taskq.demo has it.
SYNC_NOOP = "demo.noop_sync"
# The no-op handler with a payload model (scripts/bench_handlers.py), where the workers have it.
MODEL_NOOP = "bench.noop_model"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sandbox = Sandbox(args.port, pgbouncer=args.pgbouncer)
        self.figures: list[Figure] = []
        # Figures other figures are compared with: tuned, drain, defaults (tasks/s);
        # p50, p99 (ms, POST sent -> handler start).
        self.key: dict[str, float] = {}

    def add(self, workload: str, name: str, value: float, unit: str, target: str = "") -> None:
        self.figures.append(Figure(workload, name, value, unit, target))

    async def wait_succeeded(self, count: int, timeout: float) -> float:
        """Poll Postgres until ``count`` rows are SUCCEEDED; the time it happened.

        The count scans the table, so it costs the server CPU the system being
        measured could use: each poll waits half the
        time the rate so far says the rest needs, at least 20 ms and at most 0.5 s.
        That takes about half as many counts as polling every 0.25 s until 90% are
        done, then every 20 ms, and still sees the end within 20 ms (figures:
        docs/benchmark.md).
        """
        deadline = time.monotonic() + timeout
        first: tuple[float, int] | None = None
        while time.monotonic() < deadline:
            done = await self.sandbox.db.fetchval(SUCCEEDED)
            now = time.perf_counter()
            if done >= count:
                return now
            if first is None:
                first, wait = (now, done), 0.25
            else:
                rate = (done - first[1]) / (now - first[0])
                wait = (count - done) / rate / 2 if rate > 0 else 0.5
            await asyncio.sleep(min(0.5, max(0.02, wait)))
        done = await self.sandbox.db.fetchval(SUCCEEDED)
        raise RuntimeError(f"only {done} of {count} tasks SUCCEEDED after {timeout:g}s")

    async def enqueue_workloads(self) -> None:
        await enqueue_workloads(self.sandbox, self.args, self.add)
        # Leave a clean slate for the workloads with workers: nothing queued, no rows.
        await self.wait_published(120)
        amqp = await aio_pika.connect(AMQP_URL)
        channel = await amqp.channel()
        for queue in self.sandbox.settings.topology().queues:
            await (await channel.declare_queue(queue.name, passive=True)).purge()
        await amqp.close()
        await self.sandbox.db.execute("TRUNCATE taskq.tasks, taskq.task_events")

    async def wait_published(self, timeout: float) -> None:
        sql = "SELECT count(*) FROM taskq.tasks WHERE published_at IS NULL"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await self.sandbox.db.fetchval(sql):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"tasks still unpublished after {timeout:g}s")

    async def drain(self, client: Client) -> None:
        a = self.args
        await enqueue_chunks(client, "demo.noop", a.tasks)
        await self.wait_published(60)
        spawned = time.perf_counter()
        cpu = self.sandbox.cpu()
        self.sandbox.start_workers(a.workers, a.concurrency, a.prefetch)
        end = await self.wait_succeeded(a.tasks, max(120.0, a.tasks / 50))
        span = await self.sandbox.db.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM taskq.tasks"
        )
        w = "3 end to end"
        self.key["drain"] = a.tasks / float(span)
        self.add(w, f"preloaded backlog drain, {a.tasks} tasks", self.key["drain"], "tasks/s")
        self.add(w, "  same, from spawning the workers", a.tasks / (end - spawned), "tasks/s")
        used = self.cpu_since(cpu)
        self.add_cpu(w, used, a.tasks, "  worker CPU per 1000 tasks, with start-up", ("workers",))

    async def end_to_end(
        self, client: Client, workload: str, task_type: str, target: str, profile: bool = False
    ) -> float:
        """Enqueue --tasks of ``task_type`` with the workers running; the rate until the last
        SUCCEEDED, with each process's CPU per task, envelopes per task and rows per
        statement. Starts on empty tables, so that every end-to-end workload compares."""
        a, w = self.args, workload
        await self.sandbox.db.execute("TRUNCATE taskq.tasks, taskq.task_events")
        profilers = self.start_profilers() if profile and a.profile else []
        deliveries = await asyncio.to_thread(self.sandbox.deliveries)
        batches = await asyncio.to_thread(self.sandbox.batches)
        cpu = self.sandbox.cpu()
        started = time.perf_counter()
        feeding = asyncio.create_task(enqueue_chunks(client, task_type, a.tasks))
        end = await self.wait_succeeded(a.tasks, max(120.0, a.tasks / 50))
        await feeding
        used = self.cpu_since(cpu)
        rate = a.tasks / (end - started)
        self.add(w, f"end to end, {a.tasks} {task_type}", rate, "tasks/s", target)
        self.add_cpu(w, used, a.tasks, "  worker CPU per 1000 tasks", ("workers",))
        self.add_cpu(w, used, a.tasks, "  API CPU per 1000 tasks (its relay)", ("api",))
        self.add_cpu(w, used, a.tasks, "  enqueuer CPU per 1000 tasks (Python client)", ("bench",))
        self.add_cpu(w, used, a.tasks, "  Postgres CPU per 1000 tasks", ("postgres",))
        self.add_cpu(w, used, a.tasks, "  RabbitMQ CPU per 1000 tasks", ("rabbitmq",))
        if a.pgbouncer:
            self.add_cpu(w, used, a.tasks, "  PgBouncer CPU per 1000 tasks", ("pgbouncer",))
        for profiler in profilers:  # py-spy writes its profile on SIGINT
            profiler.send_signal(signal.SIGINT)
        for profiler in profilers:
            await asyncio.to_thread(profiler.wait, 30)
        # Envelopes published twice (e.g. by an outbox and a relay) arrive late: let them.
        await asyncio.sleep(2.0)
        after = await asyncio.to_thread(self.sandbox.deliveries)
        delta = {k: v - deliveries.get(k, 0.0) for k, v in after.items()}
        dropped = delta.get("duplicate", 0.0) + delta.get("terminal", 0.0)
        self.add(w, "  envelopes delivered per task", sum(delta.values()) / a.tasks, "", "1.00")
        self.add(w, "  duplicates dropped by the claim", dropped, "")
        now = await asyncio.to_thread(self.sandbox.batches)
        for statement in ("claim", "complete"):
            rows, count = now.get(statement, (0.0, 0.0))
            rows_before, count_before = batches.get(statement, (0.0, 0.0))
            mean = (rows - rows_before) / max(count - count_before, 1.0)
            self.add(w, f"  rows per {statement} statement, mean", mean, "")
        return rate

    async def variant_end_to_end(
        self, client: Client, tuned: float, workload: str, task_type: str, target: str
    ) -> None:
        """End to end with a variant of the no-op handler (sync, or with a payload model) on
        the same workers, beside the async figure; skipped (one NaN row, and a line saying
        why) where the workers have no such handler."""
        w = workload
        sql = "SELECT count(*) FROM taskq.task_type WHERE name = $1"
        if not await self.sandbox.db.fetchval(sql, task_type):
            print(f"bench: skipped {w!r}: the workers register no {task_type}", flush=True)
            self.add(w, f"skipped: the workers register no {task_type}", float("nan"), "")
            return
        rate = await self.end_to_end(client, w, task_type, "")
        self.add(w, f"  {task_type} / demo.noop (tuned)", rate / tuned, "x", target)

    async def defaults(self, tuned: float) -> None:
        """End to end with as many workers as the tuned run, at taskq's defaults."""
        a, w = self.args, "3c end to end, taskq's defaults"
        self.sandbox.stop_workers()
        self.sandbox.start_workers(a.workers)  # no --concurrency, no --prefetch
        await self.sandbox.wait_consumers(a.workers)
        await asyncio.sleep(0.5)  # as the peers' workers get, once they consume
        client = await Client.connect(self.sandbox.settings)
        try:
            rate = await self.end_to_end(client, w, "demo.noop", "")
        finally:
            await client.close()
        self.add(w, "  defaults / tuned", rate / tuned, "x", ">= 0.85")
        self.key["defaults"] = rate

    def cpu_since(self, before: dict[str, float]) -> dict[str, float]:
        """CPU seconds each process (api, workers, bench) used since ``before``."""
        return {part: value - before[part] for part, value in self.sandbox.cpu().items()}

    def add_cpu(
        self, workload: str, used: dict[str, float], count: int, name: str, parts: tuple[str, ...]
    ) -> None:
        """A figure: the CPU seconds of ``parts`` in ``used``, per 1000 of ``count``."""
        self.add(workload, name, sum(used[part] for part in parts) * 1000 / count, "s")

    def start_profilers(self) -> list[subprocess.Popen[bytes]]:
        """py-spy on the API and every worker, collapsed stacks into --profile DIR."""
        assert self.sandbox.api is not None
        os.makedirs(self.args.profile, exist_ok=True)
        py_spy = str(Path(sys.executable).parent / "py-spy")
        pids = {"api": self.sandbox.api.pid}
        pids.update({f"worker{n + 1}": w.pid for n, w in enumerate(self.sandbox.workers)})
        profilers = []
        for name, pid in pids.items():
            out = os.path.join(self.args.profile, f"{name}.txt")
            command = [py_spy, "record", "--format", "raw", "--nonblocking", "-o", out]
            command += ["--pid", str(pid)]
            profilers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        return profilers

    async def start_latency(self) -> None:
        a, w = self.args, "4 start latency"
        for name, value, target in await start_latency(self.sandbox, a.port, a.latency_tasks):
            self.add(w, name, value, "ms", target)
            if name.startswith("POST sent -> handler start"):
                self.key[name[-3:]] = value  # p50, p99: what the peers' latency measures

    async def wait_latency(self) -> None:
        for figure in await wait_latency(self.sandbox, self.args.latency_tasks):
            self.add("7 wait for a result", *figure)

    async def retry_accuracy(self, delay: float, put_at: float) -> None:
        a = self.args
        for figure in await retry_accuracy(self.sandbox, a.port, a.retry_tasks, delay, put_at):
            self.add("5 retry delay", *figure)

    def rss(self) -> None:
        assert self.sandbox.api is not None
        w = "6 peak RSS"
        self.add(w, "API", peak_rss_mb(self.sandbox.api.pid), "MB", "<= 120")
        for n, worker in enumerate(self.sandbox.workers):
            self.add(w, f"worker {n + 1}", peak_rss_mb(worker.pid), "MB", "<= 120")

    async def run(self) -> None:
        try:
            await self.sandbox.open()
            await self.sandbox.start_api()
            await self.enqueue_workloads()
            client = await Client.connect(self.sandbox.settings)
            try:
                await self.drain(client)
                put_at = await put_backoff(self.args.port, 1)
                target = ">= 12x celery+pg, 3x celery, 2x dramatiq"
                tuned = await self.end_to_end(client, "3 end to end", "demo.noop", target, True)
                self.key["tuned"] = tuned
                await self.variant_end_to_end(
                    client, tuned, "3b end to end, sync handler", SYNC_NOOP, ">= 0.75"
                )
                await self.variant_end_to_end(
                    client, tuned, "3d end to end, payload model", MODEL_NOOP, ">= 0.90"
                )
            finally:
                await client.close()
            await self.start_latency()
            await self.retry_accuracy(1, put_at)
            await self.retry_accuracy(5, await put_backoff(self.args.port, 5))
            await self.wait_latency()
            self.rss()
            await self.defaults(tuned)
            self.sandbox.stop_workers()
            self.sandbox.stop_api()  # idle, but the peers get the machine to themselves
            for peer in self.args.peer:
                await self.peer(peer)
            # In the table by workload (3c ran after 6, for the workers it restarts).
            self.figures.sort(key=lambda f: f.workload)
        finally:
            await self.sandbox.close()

    async def peer(self, name: str) -> None:
        """Every variant of peer ``name``, tuned then at its defaults."""
        from peers.runner import VARIANTS, measure

        a, url = self.args, self.sandbox.database_url
        for variant in (v for v in VARIANTS if v.startswith(name)):
            tasks = self.peer_tasks(variant)
            args = (variant, a.workers, a.peer_concurrency, url, tasks, a.latency_tasks)
            tuned = await measure(*args, defaults=False)
            defaults = await measure(*args, defaults=True)
            self.add_peer(variant, VARIANTS[variant], tuned, defaults)

    def peer_tasks(self, variant: str) -> int:
        """Tasks per peer workload: --tasks, the same workload as taskq's, but at most
        --slow-peer-tasks for Celery with Postgres results (by far the slowest peer)."""
        if variant == "celery+pg" and self.args.slow_peer_tasks:
            return min(self.args.tasks, self.args.slow_peer_tasks)
        return int(self.args.tasks)

    def add_peer(
        self, variant: str, label: str, tuned: dict[str, float], defaults: dict[str, float]
    ) -> None:
        w, tasks = f"peer {variant}", f"{tuned['tasks']:.0f} tasks"
        faster = "  taskq / peer (higher: taskq faster)"
        for key, name, ours, target in (
            ("e2e_tasks_per_s", "end to end", "tuned", E2E_TARGETS[variant]),
            ("drain_tasks_per_s", "preloaded backlog drain", "drain", ""),
        ):
            self.add(w, f"{label}: {name}, {tasks}", tuned[key], "tasks/s")
            self.add(w, faster, self.key[ours] / tuned[key], "x", target)
        peer = defaults["e2e_tasks_per_s"]
        self.add(w, f"{label} at its defaults: end to end, {tasks}", peer, "tasks/s")
        self.add(w, "  peer defaults / tuned", peer / tuned["e2e_tasks_per_s"], "x")
        self.add(w, "  taskq defaults / peer defaults", self.key["defaults"] / peer, "x", ">= 1")
        # The peers' latency runs from the enqueuer's send to the handler's start.
        for p in ("p50", "p99"):
            self.add(w, f"{label}: start latency {p} (send -> handler)", tuned[f"latency_{p}_ms"],
                     "ms")  # fmt: skip
            ratio = self.key[p] / tuned[f"latency_{p}_ms"]
            target = "<= 1" if variant == "dramatiq" else ""
            self.add(w, "  taskq / peer (lower: taskq faster)", ratio, "x", target)

    def header(self) -> str:
        a = self.args
        peers = a.peer_concurrency or os.cpu_count()
        return (
            f"taskq bench: {a.workers} worker(s) x concurrency {a.concurrency}, prefetch "
            f"{a.prefetch} (3c: {a.workers} at taskq's defaults); {os.cpu_count()} CPUs; "
            f"{'through PgBouncer (transaction pooling); ' if a.pgbouncer else ''}peers: "
            f"{', '.join(a.peer) or 'none'} (tuned: Celery prefork x {peers} per worker without"
            f" gossip, mingle, heartbeat, Dramatiq {a.workers} process(es) x"
            f" {a.peer_concurrency or 8} threads; defaults: {a.workers} `celery worker`, one"
            " `dramatiq`, no flags)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (< 1 minute)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--concurrency", type=int, default=200, help="per worker (default 200)")
    parser.add_argument("--prefetch", type=int, help="per worker (default: the concurrency)")
    parser.add_argument("--tasks", type=int, help="end-to-end tasks (default 20000, quick 2000)")
    parser.add_argument("--peer", action="append", default=[], choices=["celery", "dramatiq"])
    parser.add_argument(
        "--peer-concurrency",
        type=int,
        help="Celery prefork processes per worker (default: CPUs, Celery's default), "
        "Dramatiq threads per process (default 8, Dramatiq's default)",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy the API and workers during end to end into DIR"
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat, then print medians too")
    parser.add_argument(
        "--slow-peer-tasks",
        type=int,
        help="at most this many tasks for Celery with Postgres results (default: --tasks,"
        " like every other workload; 20,000 take it 1-2 minutes)",
    )
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="the API, workers and clients reach Postgres through a private PgBouncer in"
        " transaction pooling mode (the peers do not)",
    )
    parser.add_argument(
        "--workflows",
        action="store_true",
        help="instead of the workloads above, issue #18's (scripts/bench_workflows.py): a"
        " fan-out with a callback and a chain, at taskq's defaults; with --peer celery,"
        " Celery's chord and chain",
    )
    add_workflow_arguments(parser)
    parser.add_argument("--port", type=int, default=18932)
    args = parser.parse_args()
    if args.workflows:
        run_workflows(args)
        return
    quick = args.quick
    args.prefetch = args.prefetch or args.concurrency
    args.tasks = args.tasks or (2000 if quick else 20000)
    args.clients = 32
    args.seconds = 2.0 if quick else 10.0
    args.batches = 8 if quick else 40
    args.batch_size = 500
    args.client_tasks = 2000 if quick else 20000
    args.latency_tasks = 100 if quick else 300
    args.retry_tasks = 10 if quick else 20
    runs: list[list[Figure]] = []
    seconds: list[float] = []
    header = ""
    for n in range(args.runs):
        started = time.monotonic()
        bench = Bench(args)
        asyncio.run(bench.run())
        seconds.append(time.monotonic() - started)
        header = bench.header()
        if args.runs > 1:
            print(f"--- run {n + 1} of {args.runs}")
            report(header, [bench.figures], seconds[-1:])
        if runs and [(f.workload, f.unit) for f in runs[0]] != [
            (f.workload, f.unit) for f in bench.figures
        ]:
            raise RuntimeError("the runs measured different figures")
        runs.append(bench.figures)
    if args.runs > 1:
        print(f"--- median of {args.runs} runs")
    report(header, runs, seconds)


if __name__ == "__main__":
    main()
