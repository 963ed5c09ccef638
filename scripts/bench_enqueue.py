"""Enqueue benchmark: single POST /enqueue at N concurrent clients, batch enqueue, Python client.

Starts `taskq api` itself against a fresh database and namespace on the local
Postgres and RabbitMQ, prints a table and one JSON line per figure, and cleans up.

    .venv/bin/python scripts/bench_enqueue.py [--seconds 10] [--clients 32] [--batches 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

from taskq import broker
from taskq.client import Client
from taskq.migrate import migrate
from taskq.settings import load_settings


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client, so the load generator costs little CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
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

    def close(self) -> None:
        self.writer.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def single_requests(port: int, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal errors
        conn = HttpConnection("127.0.0.1", port)
        await conn.open()
        i = 0
        while time.perf_counter() < stop:
            body = json.dumps({"type": "demo.noop", "payload": {"c": n, "i": i}}).encode()
            started = time.perf_counter()
            status, _ = await conn.post("/enqueue", body)
            latencies.append(time.perf_counter() - started)
            errors += status != 201
            i += 1
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "requests": len(latencies),
        "errors": errors,
    }


async def batch_requests(port: int, batches: int, size: int, concurrency: int) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(batches):
        queue.put_nowait(n)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = HttpConnection("127.0.0.1", port)
        await conn.open()
        while not queue.empty():
            n = queue.get_nowait()
            tasks = [{"type": "demo.noop", "payload": {"b": n, "i": i}} for i in range(size)]
            status, _ = await conn.post("/enqueue/batch", json.dumps({"tasks": tasks}).encode())
            errors += status != 201
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"tasks_per_s": batches * size / elapsed, "tasks": batches * size, "errors": errors}


async def python_client(settings, count: int, concurrency: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    client = await Client.connect(settings)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.enqueue("demo.noop", {"i": i})

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    await client.close()
    return {"tasks_per_s": count / elapsed, "tasks": count}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--client-tasks", type=int, default=20000)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--profile", help="write a py-spy profile of the API to this file")
    args = parser.parse_args()

    base = os.environ.get(
        "TASKQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = f"taskq_bench_{uuid.uuid4().hex[:8]}"
    database_url = urlunsplit(urlsplit(base)._replace(path="/" + name))
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    amqp_url = os.environ.get("TASKQ_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    settings = load_settings(
        _env_file=None, database_url=database_url, amqp_url=amqp_url, namespace=namespace
    )
    await migrate(database_url)
    connection = await broker.connect(amqp_url, name="bench", robust=False)
    await broker.declare(connection, settings.topology())
    await connection.close()
    db = await asyncpg.connect(database_url)
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")

    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKQ_")}
    env.update(
        TASKQ_DATABASE_URL=database_url,
        TASKQ_AMQP_URL=amqp_url,
        TASKQ_NAMESPACE=namespace,
        TASKQ_LOG_LEVEL="WARNING",
    )
    api = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "taskq", "api", "--port", str(args.port)], env=env
    )
    results: dict[str, dict[str, float]] = {}
    try:
        for _ in range(100):
            try:
                conn = HttpConnection("127.0.0.1", args.port)
                await conn.open()
                conn.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await single_requests(args.port, args.clients, 1.0)  # warm up
        if args.profile:
            py_spy = str(Path(sys.executable).parent / "py-spy")
            command = [py_spy, "record", "--format", "raw", "-o", args.profile]
            command += ["--pid", str(api.pid), "--duration", str(int(args.seconds))]
            subprocess.Popen(command)  # noqa: ASYNC220 - started once, before the measurement
        results["single"] = await single_requests(args.port, args.clients, args.seconds)
        results["batch"] = await batch_requests(args.port, args.batches, args.batch_size, 4)
        results["python_client"] = await python_client(settings, args.client_tasks, 256)
        unpublished = await db.fetchval("SELECT count(*) FROM tasks WHERE published_at IS NULL")
        results["after"] = {"unpublished_rows": float(unpublished)}
    finally:
        api.terminate()
        api.wait(10)
        await db.close()
        server = await asyncpg.connect(base)
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await server.close()
        amqp = await aio_pika.connect(amqp_url)
        channel = await amqp.channel()
        topology = settings.topology()
        for queue in topology.queues:
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)
        await amqp.close()

    single, batch = results["single"], results["batch"]
    rows = [
        (f"single POST /enqueue, {args.clients} clients", f"{single['requests_per_s']:.0f} req/s"),
        ("  latency p50 / p99", f"{single['p50_ms']:.1f} / {single['p99_ms']:.1f} ms"),
        (
            f"POST /enqueue/batch ({args.batch_size} per request)",
            f"{batch['tasks_per_s']:.0f} tasks/s",
        ),
        (
            "Python client (256 concurrent enqueues)",
            f"{results['python_client']['tasks_per_s']:.0f} tasks/s",
        ),
        ("errors (single / batch)", f"{single['errors']:.0f} / {batch['errors']:.0f}"),
    ]
    print()
    for label, figure in rows:
        print(f"{label:<44} {figure:>18}")
    print()
    for workload, figures in results.items():
        print(json.dumps({"bench": "enqueue", "workload": workload, **figures}))


if __name__ == "__main__":
    asyncio.run(main())
