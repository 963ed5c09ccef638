"""Run workload (3) end to end and backlog drain, and (4) start latency, on one peer.

Each variant gets a fresh queue on the benchmark's RabbitMQ, its workers and
enqueuers as subprocesses, and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
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
VARIANTS = {
    "celery": "Celery 5, no results",
    "celery+pg": "Celery 5, Postgres results",
    "dramatiq": "Dramatiq",
}


class Peer:
    def __init__(self, variant: str, workers: int, concurrency: int, database_url: str) -> None:
        self.variant = variant
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
            command += ["--processes", str(self.workers), "--threads", str(self.concurrency)]
            command += ["--queues", self.queue]
            self.processes.append(subprocess.Popen(command, env=env, cwd=SCRIPTS, stdout=DEVNULL))
            return
        for n in range(self.workers):
            command = [str(Path(sys.executable).parent / "celery"), "-A", self.module, "worker"]
            command += ["--pool", "prefork", "--concurrency", str(self.concurrency)]
            command += ["--hostname", f"{self.queue}-{n}@%h", "--loglevel", "WARNING"]
            command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
            self.processes.append(subprocess.Popen(command, env=env, cwd=SCRIPTS, stdout=DEVNULL))

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
        # End to end, workers running: first enqueue until every task ran.
        await wait_consumers(self.queue, 1, 30)
        await asyncio.sleep(0.5)
        enqueuer = self.enqueue(tasks)
        end = await self.wait_done(marks, 2 * tasks, timeout, enqueuer)
        out, _ = await asyncio.to_thread(enqueuer.communicate)
        figures["e2e_tasks_per_s"] = tasks / (end - float(out))
        # Start latency at low load: one task every 20 ms.
        enqueuer = self.enqueue(latency_tasks, 0.02)
        await asyncio.to_thread(enqueuer.communicate)
        await self.wait_done(marks, 2 * tasks + latency_tasks, timeout, enqueuer)
        latencies = [lat for _, lat in read_marks(marks)[2 * tasks :]]
        figures["latency_p50_ms"] = percentile(latencies, 0.5) * 1000
        figures["latency_p99_ms"] = percentile(latencies, 0.99) * 1000
        figures["tasks"] = tasks
        return figures

    async def close(self) -> None:
        stop(self.processes)
        amqp = await aio_pika.connect(AMQP_URL)
        channel = await amqp.channel()
        for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
            await channel.queue_delete(name)
        if self.variant != "dramatiq":
            await channel.exchange_delete(self.queue)
        await amqp.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


async def run_peer(
    variant: str, workers: int, concurrency: int, database_url: str, tasks: int, latency: int
) -> dict[str, float]:
    peer = Peer(variant, workers, concurrency, database_url)
    try:
        return await peer.run(tasks, latency, timeout=max(120.0, tasks / 50))
    finally:
        await peer.close()
