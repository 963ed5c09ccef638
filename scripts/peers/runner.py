"""Run workload (3) end to end and backlog drain, and (4) start latency, on one peer;
or, at the peer's defaults, end to end only.

Each variant gets a fresh queue on the benchmark's RabbitMQ, its workers and
enqueuers as subprocesses, and leaves nothing behind.

Tuned, the workers run as `scripts/bench` has always run them: Celery's prefork
pool at ``concurrency`` processes per worker without gossip, mingle and
heartbeats; Dramatiq with ``workers`` processes of ``concurrency`` threads. At
their defaults, the worker command names the app and nothing else: ``celery -A
peers.celery_noop worker`` (``workers`` of them, as taskq runs ``workers``
processes) and one ``dramatiq peers.dramatiq_noop`` (a process per CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from subprocess import DEVNULL

import aio_pika
import asyncpg
from benchlib import AMQP_URL, percentile, stop, wait_consumers

from peers import count_marks, read_marks

SCRIPTS = Path(__file__).resolve().parent.parent
FIGURES = ("e2e_tasks_per_s", "drain_tasks_per_s", "latency_p50_ms", "latency_p99_ms")
VARIANTS = {
    "celery": "Celery 5, no results",
    "celery+pg": "Celery 5, Postgres results",
    "dramatiq": "Dramatiq",
}


class Peer:
    def __init__(
        self, variant: str, workers: int, concurrency: int, database_url: str, defaults: bool
    ) -> None:
        self.variant = variant
        self.defaults = defaults
        self.workers = workers
        self.concurrency = concurrency
        self.database_url = database_url
        self.queue = f"bench_{variant.replace('+', '_')}_{uuid.uuid4().hex[:6]}"
        self.module = "peers.dramatiq_noop" if variant == "dramatiq" else "peers.celery_noop"
        self.dir = tempfile.mkdtemp(prefix="taskq-bench-")
        self.env = dict(os.environ, PYTHONPATH=str(SCRIPTS), BENCH_PEER_QUEUE=self.queue)
        self.env["BENCH_PEER_BROKER"] = AMQP_URL
        if variant == "celery+pg":
            # SQLAlchemy's driver named explicitly: psycopg2, the driver Celery documents.
            url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
            self.env["BENCH_PEER_BACKEND"] = "db+" + url
        self.processes: list[subprocess.Popen[bytes]] = []

    def start_workers(self, marks: str) -> None:
        env = dict(self.env, BENCH_PEER_MARKS=marks)
        if self.variant == "dramatiq":
            command = [str(Path(sys.executable).parent / "dramatiq"), self.module]
            if not self.defaults:
                command += ["--processes", str(self.workers), "--threads", str(self.concurrency)]
                command += ["--queues", self.queue]
            self.processes.append(subprocess.Popen(command, env=env, cwd=SCRIPTS, stdout=DEVNULL))
            return
        for n in range(self.workers):
            command = [str(Path(sys.executable).parent / "celery"), "-A", self.module, "worker"]
            # A node name of its own (two workers with one name warn and clash) and
            # the log level (stderr only) change nothing measured.
            command += ["--hostname", f"{self.queue}-{n}@%h", "--loglevel", "WARNING"]
            if not self.defaults:
                command += ["--pool", "prefork", "--concurrency", str(self.concurrency)]
                command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
            self.processes.append(subprocess.Popen(command, env=env, cwd=SCRIPTS, stdout=DEVNULL))

    def consumers(self) -> int:
        """The consumers the workers open on the queue: one per Celery worker, one per
        Dramatiq process (a process per CPU at its defaults)."""
        if self.variant == "dramatiq" and self.defaults:
            return os.cpu_count() or 1
        return self.workers

    def enqueue(self, count: int, interval: float = 0.0) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", self.module, "enqueue", str(count)]
        if interval:
            command.append(str(interval))
        return subprocess.Popen(command, env=self.env, cwd=SCRIPTS, stdout=subprocess.PIPE)

    async def wait_done(
        self, marks: str, count: int, timeout: float, enqueuer: subprocess.Popen[bytes]
    ) -> float:
        """Wait until the marks file holds ``count`` records (and as many results are
        stored, with a result backend); the time it happened."""
        db = await asyncpg.connect(self.database_url) if self.variant == "celery+pg" else None
        sql = "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if enqueuer.poll():
                    raise RuntimeError(f"{self.variant}: the enqueuer failed")
                if any(p.poll() is not None for p in self.processes):
                    raise RuntimeError(f"{self.variant}: a worker exited")
                if count_marks(marks) >= count and (db is None or await db.fetchval(sql) >= count):
                    return time.time()
                await asyncio.sleep(0.02)
        finally:
            if db is not None:
                await db.close()
        raise RuntimeError(
            f"{self.variant}: {count_marks(marks)} of {count} tasks ran within {timeout:g}s"
        )

    async def run(self, tasks: int, latency_tasks: int, timeout: float) -> dict[str, float]:
        """One marks file for all three phases; each phase reads its slice."""
        marks = os.path.join(self.dir, "marks")
        figures: dict[str, float] = {}
        # Backlog drain: enqueue with no worker running, then start the workers.
        enqueuer = self.enqueue(tasks)
        await asyncio.to_thread(enqueuer.communicate)
        self.start_workers(marks)
        end = await self.wait_done(marks, tasks, timeout, enqueuer)
        first = min(start for start, _ in read_marks(marks))
        figures["drain_tasks_per_s"] = tasks / (end - first)
        figures["e2e_tasks_per_s"] = await self.end_to_end(marks, tasks, tasks, timeout)
        # Start latency at low load: one task every 20 ms.
        enqueuer = self.enqueue(latency_tasks, 0.02)
        await asyncio.to_thread(enqueuer.communicate)
        await self.wait_done(marks, 2 * tasks + latency_tasks, timeout, enqueuer)
        latencies = [lat for _, lat in read_marks(marks)[2 * tasks :]]
        figures["latency_p50_ms"] = percentile(latencies, 0.5) * 1000
        figures["latency_p99_ms"] = percentile(latencies, 0.99) * 1000
        figures["tasks"] = tasks
        return figures

    async def end_to_end(self, marks: str, done: int, tasks: int, timeout: float) -> float:
        """With the workers running and ``done`` tasks in the marks file: the rate from the
        first enqueue until every one of ``tasks`` more ran."""
        await wait_consumers(self.queue, self.consumers(), 30)
        await asyncio.sleep(0.5)
        enqueuer = self.enqueue(tasks)
        end = await self.wait_done(marks, done + tasks, timeout, enqueuer)
        out, _ = await asyncio.to_thread(enqueuer.communicate)
        return tasks / (end - float(out))

    async def run_defaults(self, tasks: int, timeout: float) -> dict[str, float]:
        """End to end only, the workers just started."""
        marks = os.path.join(self.dir, "marks")
        self.start_workers(marks)
        return {"e2e_tasks_per_s": await self.end_to_end(marks, 0, tasks, timeout), "tasks": tasks}

    async def close(self) -> None:
        stop(self.processes)
        amqp = await aio_pika.connect(AMQP_URL)
        channel = await amqp.channel()
        for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
            await channel.queue_delete(name)
        if self.variant != "dramatiq":
            await channel.exchange_delete(self.queue)
            # Celery's events and remote control (gossip and mingle, on at its defaults)
            # declare these; left alone where anything else has a queue bound to them.
            for name in ("celeryev", "celery.pidbox", "reply.celery.pidbox"):
                with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                    await channel.exchange_delete(name, if_unused=True)
                if channel.is_closed:
                    channel = await amqp.channel()
        await amqp.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


async def measure(
    variant: str,
    workers: int,
    concurrency: int | None,
    database_url: str,
    tasks: int,
    latency: int,
    defaults: bool,
) -> dict[str, float]:
    """The figures of one variant: ``tasks`` and ``e2e_tasks_per_s``, tuned also
    ``drain_tasks_per_s``, ``latency_p50_ms`` and ``latency_p99_ms``.

    ``concurrency`` (tuned only) defaults to each peer's own default: Celery's
    prefork pool a process per CPU, Dramatiq 8 threads. A variant that fails (it
    stalls, say) says so on stderr and gets NaN figures, so that it loses none of
    the others (medians leave NaN out).
    """
    if concurrency is None:
        concurrency = 8 if variant == "dramatiq" else os.cpu_count() or 2
    peer = Peer(variant, workers, concurrency, database_url, defaults)
    timeout = max(120.0, tasks / 50)
    try:
        if defaults:
            return await peer.run_defaults(tasks, timeout)
        return await peer.run(tasks, latency, timeout)
    except RuntimeError as exc:
        how = "at its defaults" if defaults else "tuned"
        print(f"bench: peer {variant} {how} failed: {exc}", file=sys.stderr)
        return dict.fromkeys(FIGURES, float("nan")) | {"tasks": tasks}
    finally:
        await peer.close()
