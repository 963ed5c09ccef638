"""Pieces shared by the benchmark scripts: a sandbox (fresh database and
namespace, the API and workers as subprocesses), a minimal HTTP client, CPU and
memory readings, and the enqueue feeder of the end-to-end workloads.

Not a command of its own; `scripts/bench` and `scripts/bench_enqueue.py` import it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

from taskq.amqp import broker
from taskq.client import Client
from taskq.migrate import migrate
from taskq.settings import Settings, load_settings

SCRIPTS = Path(__file__).resolve().parent
# The workers' handlers: taskq.demo's and bench.stamp (scripts/bench_handlers.py).
WORKER_MODULE = "bench_handlers"
SERVER_URL = os.environ.get(
    "TASKQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("TASKQ_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# Server connections of --pgbouncer's bouncer per database: the API's, the workers' and
# the enqueuer's pools (10 client connections each) share them.
BOUNCER_POOL_SIZE = 20


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client, so the load generator costs little CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self.request("POST", path, body)

    def close(self) -> None:
        self.writer.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def database_url(name: str, server_url: str = SERVER_URL) -> str:
    """The URL of database ``name`` on the benchmark's Postgres server (or ``server_url``)."""
    return urlunsplit(urlsplit(server_url)._replace(path="/" + name))


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used so far, in seconds."""
    return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())


def _stat_cpu(stat: str) -> float:
    """utime + stime of a /proc/PID/stat text, in seconds."""
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_cpu_seconds(names: tuple[str, ...]) -> float:
    """CPU seconds used so far by the live processes whose command is one of ``names``
    (the servers: Postgres backends, RabbitMQ's Erlang VM); a backend that exited
    in between is not counted."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] in names:
            total += _stat_cpu(stat)
    return total


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by the live processes ``pids`` (by name), this one
    ("bench") and the two servers ("postgres", "rabbitmq")."""
    used = {name: cpu_seconds(pid) for name, pid in pids.items()}
    used["bench"] = time.process_time()
    used["postgres"] = service_cpu_seconds(("postgres",))
    used["rabbitmq"] = service_cpu_seconds(("beam.smp",))
    used["pgbouncer"] = service_cpu_seconds(("pgbouncer",))
    return used


def scrape_counter(port: int, name: str, label: str) -> dict[str, float]:
    """Sum the samples of counter ``name`` on a /metrics endpoint by one ``label``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line.rpartition(" ")
        match = re.search(label + r'="([^"]*)"', labels)
        if match is not None:
            sums[match[1]] = sums.get(match[1], 0.0) + float(value)
    return sums


class Sandbox:
    """A fresh database and namespace on the local services, with the API and
    workers started as subprocesses; :meth:`close` stops them and removes both.

    With ``pgbouncer``, :meth:`open` starts a private PgBouncer (transaction pooling,
    the tests' launcher in ``tests/support/pgbouncer.py``) in front of the database:
    the API, the workers and :attr:`settings` (the benchmark's clients) reach it
    through the bouncer, their sessions (LISTEN, leader locks) and the benchmark's own
    reads (:attr:`db`) directly.
    """

    def __init__(self, port: int, *, pgbouncer: bool = False, server_url: str = SERVER_URL) -> None:
        self.port = port
        self.pgbouncer = pgbouncer
        self.bouncer: Any = None
        self.server_url = server_url
        # TASKQ_HISTORY_PARTITION of the migration's first partitions.
        self.history_partition = 86400.0
        self.name = f"taskq_bench_{uuid.uuid4().hex[:8]}"
        self.database_url = database_url(self.name, server_url)
        self.namespace = f"bench{uuid.uuid4().hex[:6]}"
        self.settings: Settings = load_settings(
            _env_file=None,
            database_url=self.database_url,
            amqp_url=AMQP_URL,
            namespace=self.namespace,
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TASKQ_")}
        self.env.update(
            TASKQ_DATABASE_URL=self.database_url,
            TASKQ_AMQP_URL=AMQP_URL,
            TASKQ_NAMESPACE=self.namespace,
            # demo.fail's attempts log a WARNING each; errors still show.
            TASKQ_LOG_LEVEL="ERROR",
            PYTHONPATH=os.pathsep.join(
                [str(SCRIPTS), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        )
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    async def open(self) -> None:
        """Migrate, declare the topology and register ``demo.noop`` (so a backlog
        can be enqueued before any worker registers its types)."""
        if self.pgbouncer:
            self._start_bouncer()
        await migrate(self.database_url, history_partition=self.history_partition)
        connection = await broker.connect(AMQP_URL, name="bench", robust=False)
        await broker.declare(connection, self.settings.topology())
        await connection.close()
        self.db = await asyncpg.connect(self.database_url)
        await self.db.execute(
            "INSERT INTO taskq.task_type (name, queue) VALUES ('demo.noop', 'default')"
        )

    def _start_bouncer(self) -> None:
        sys.path.insert(0, str(SCRIPTS.parent))  # the repository's root, for tests.support
        from tests.support.pgbouncer import PrivateBouncer, pgbouncer_binary

        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("--pgbouncer: no pgbouncer binary (apt-get install pgbouncer)")
        base = Path(tempfile.mkdtemp(prefix="taskq-bench-pgbouncer-"))
        self.bouncer = PrivateBouncer(binary, base, self.server_url, pool_size=BOUNCER_POOL_SIZE)
        self.bouncer.start()
        pooled = self.bouncer.via(self.database_url)
        self.settings = self.settings.model_copy(
            update={
                "database_url": pooled,
                "database_session_url": self.database_url,
                "database_pooler": "pgbouncer",
            }
        )
        self.env.update(
            TASKQ_DATABASE_URL=pooled,
            TASKQ_DATABASE_SESSION_URL=self.database_url,
            TASKQ_DATABASE_POOLER="pgbouncer",
        )

    async def start_api(self) -> None:
        self.api = subprocess.Popen(  # noqa: ASYNC220 - started before any measurement
            [sys.executable, "-m", "taskq", "api", "--port", str(self.port)], env=self.env
        )
        await wait_listening(self.port, "the API")

    async def start_bare(self, port: int) -> subprocess.Popen[bytes]:
        """Start the bare-ASGI reference (scripts/bare_asgi.py) on ``port``; stop it with
        :func:`stop`."""
        command = [sys.executable, str(SCRIPTS / "bare_asgi.py"), "--port", str(port)]
        bare = subprocess.Popen(command, env=self.env)  # noqa: ASYNC220 - before measuring
        await wait_listening(port, "the bare-ASGI app")
        return bare

    def start_workers(
        self, count: int, concurrency: int | None = None, prefetch: int | None = None
    ) -> None:
        """Start ``count`` workers, with taskq's defaults where ``concurrency`` or
        ``prefetch`` is None (no flag); worker n serves its metrics on :meth:`metrics_port`."""
        for _ in range(count):
            command = [sys.executable, "-m", "taskq", "worker", WORKER_MODULE]
            if concurrency is not None:
                command += ["--concurrency", str(concurrency)]
            if prefetch is not None:
                command += ["--prefetch", str(prefetch)]
            command += ["--metrics-port", str(self.metrics_port(len(self.workers)))]
            command += ["--metrics-host", "127.0.0.1"]
            self.workers.append(subprocess.Popen(command, env=self.env))

    def metrics_port(self, worker: int) -> int:
        return self.port + 1 + worker

    def deliveries(self) -> dict[str, float]:
        """The workers' deliveries so far by claim decision (claimed, duplicate, terminal, ...)."""
        total: dict[str, float] = {}
        for n in range(len(self.workers)):
            counts = scrape_counter(self.metrics_port(n), "taskq_deliveries_total", "decision")
            for decision, value in counts.items():
                total[decision] = total.get(decision, 0.0) + value
        return total

    def batches(self) -> dict[str, tuple[float, float]]:
        """The workers' statements so far: (rows, statements) by statement (claim, complete)."""
        total: dict[str, tuple[float, float]] = {}
        for n in range(len(self.workers)):
            port = self.metrics_port(n)
            rows = scrape_counter(port, "taskq_worker_batch_size_sum", "statement")
            count = scrape_counter(port, "taskq_worker_batch_size_count", "statement")
            for statement, value in rows.items():
                before = total.get(statement, (0.0, 0.0))
                total[statement] = (before[0] + value, before[1] + count.get(statement, 0.0))
        return total

    def queue_wait(self) -> tuple[float, float]:
        """The workers' ``taskq_task_queue_wait_seconds`` so far: (sum, count), summed."""
        total, count = 0.0, 0.0
        for n in range(len(self.workers)):
            port = self.metrics_port(n)
            total += sum(
                scrape_counter(port, "taskq_task_queue_wait_seconds_sum", "queue").values()
            )
            count += sum(
                scrape_counter(port, "taskq_task_queue_wait_seconds_count", "queue").values()
            )
        return total, count

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the API, the workers (summed), this process and
        the two servers."""
        assert self.api is not None
        used = cpu_now({"api": self.api.pid})
        used["workers"] = sum(cpu_seconds(w.pid) for w in self.workers)
        return used

    async def wait_consumers(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` consumers listen on the default work queue."""
        queue = self.settings.topology().names.queue(self.settings.default_queue)
        await wait_consumers(queue, count, timeout)

    def stop_workers(self) -> None:
        stop(self.workers)
        self.workers = []

    def stop_api(self) -> None:
        if self.api is not None:
            stop([self.api])

    async def close(self) -> None:
        self.stop_workers()
        self.stop_api()
        if hasattr(self, "db"):
            await self.db.close()
        if self.bouncer is not None:
            self.bouncer.stop()
        server = await asyncpg.connect(self.server_url)
        await server.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await server.close()
        amqp = await aio_pika.connect(AMQP_URL)
        channel = await amqp.channel()
        topology = self.settings.topology()
        for queue in topology.queues:
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)
        await amqp.close()


def stop(processes: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM the processes we started, then SIGKILL those that outlive ``timeout``."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_listening(port: int, what: str) -> None:
    """Wait until something accepts connections on ``port`` (10 s at most)."""
    for _ in range(200):
        try:
            conn = HttpConnection("127.0.0.1", port)
            await conn.open()
            conn.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on port {port}")


async def wait_consumers(queue: str, count: int, timeout: float = 30.0) -> None:
    """Wait until ``count`` consumers listen on ``queue`` (which may not exist yet)."""
    deadline = time.monotonic() + timeout
    amqp = await aio_pika.connect(AMQP_URL)
    try:
        while time.monotonic() < deadline:
            channel = await amqp.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                if declared.declaration_result.consumer_count >= count:
                    return
                await channel.close()
            except aio_pika.exceptions.ChannelClosed:
                pass  # not declared yet
            await asyncio.sleep(0.05)
        raise RuntimeError(f"fewer than {count} consumers on {queue} after {timeout:g}s")
    finally:
        await amqp.close()


async def enqueue_chunks(
    client: Client, task_type: str, count: int, chunk: int = 500, concurrency: int = 4
) -> None:
    """Enqueue ``count`` tasks with ``Client.enqueue_many``, ``chunk`` per call."""
    starts: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, count, chunk):
        starts.put_nowait(start)

    async def feeder() -> None:
        while not starts.empty():
            start = starts.get_nowait()
            items: list[Any] = [
                {"type": task_type, "payload": {"i": i}}
                for i in range(start, min(count, start + chunk))
            ]
            await client.enqueue_many(items)

    await asyncio.gather(*(feeder() for _ in range(concurrency)))
