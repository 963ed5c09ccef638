"""Enqueue workloads 1 and 2 of `scripts/bench`: single POST /enqueue at N concurrent
clients beside the bare-ASGI reference, batch enqueue, and the Python client.

Run alone, it starts `taskq api` itself against a fresh database and namespace on
the local Postgres and RabbitMQ, prints a table and one JSON line per figure, and
cleans up. `scripts/bench` runs the same workloads and more.

    .venv/bin/python scripts/bench_enqueue.py [--seconds 10] [--clients 32] [--batches 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench_report import Figure, report
from benchlib import (
    HttpConnection,
    Sandbox,
    cpu_now,
    enqueue_chunks,
    percentile,
    stop,
)

from taskq.client import Client
from taskq.settings import Settings

# The bare-ASGI reference listens this far above --port (the workers' metrics
# take the ports right above it).
BARE_PORT_OFFSET = 50

Add = Callable[..., None]  # Bench.add: (workload, name, value, unit, target="")


async def single_requests(port: int, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal errors
        conn = HttpConnection("127.0.0.1", port)
        await conn.open()
        i = 0
        while time.perf_counter() < stop_at:
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


async def python_client(settings: Settings, count: int, concurrency: int) -> dict[str, float]:
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


async def _single(
    port: int, clients: int, seconds: float, pids: dict[str, int]
) -> dict[str, float]:
    """Single POST /enqueue after a second of warm-up; with each process's CPU seconds."""
    await single_requests(port, clients, 1.0)
    before = cpu_now(pids)
    figures = await single_requests(port, clients, seconds)
    return figures | {k: v - before[k] for k, v in cpu_now(pids).items()}


def _add_single(
    add: Add, label: str, single: dict[str, float], cpu: dict[str, str], targets: tuple[str, str]
) -> None:
    """The figures of one :func:`_single`; ``targets`` of its rate and its p99;
    ``cpu`` names the processes whose CPU to show."""
    w = "1 enqueue"
    add(w, label, single["requests_per_s"], "req/s", targets[0])
    add(w, "  latency p50", single["p50_ms"], "ms")
    add(w, "  latency p99", single["p99_ms"], "ms", targets[1])
    add(w, "  errors", single["errors"], "")
    for part, name in cpu.items():
        add(w, f"  {name} CPU per 1000 requests", single[part] * 1000 / single["requests"], "s")


async def enqueue_workloads(sandbox: Sandbox, args: argparse.Namespace, add: Add) -> None:
    """Workloads 1 and 2 against the running API; the bare-ASGI reference first, while
    the API is idle. Needs args.port, clients, seconds, batches, batch_size, client_tasks."""
    assert sandbox.api is not None
    a = args
    bare_port = a.port + BARE_PORT_OFFSET
    bare = await sandbox.start_bare(bare_port)
    try:
        reference = await _single(bare_port, a.clients, a.seconds, {"app": bare.pid})
    finally:
        stop([bare])
    single = await _single(a.port, a.clients, a.seconds, {"api": sandbox.api.pid})
    _add_single(add, f"taskq single POST /enqueue, {a.clients} clients", single, {
        "api": "API", "bench": "load generator", "postgres": "Postgres", "rabbitmq": "RabbitMQ",
    }, (">= 1500", "<= 50"))  # fmt: skip
    label = f"bare ASGI app (uvicorn, orjson, 201), {a.clients} clients"
    _add_single(add, label, reference, {"app": "app", "bench": "load generator"}, ("", ""))
    rate = single["requests_per_s"] / reference["requests_per_s"]
    add("1 enqueue", "taskq / bare app: request rate", rate, "x", ">= 0.40")
    p99 = single["p99_ms"] / reference["p99_ms"]
    add("1 enqueue", "taskq / bare app: latency p99", p99, "x", "<= 4")
    w = "2 batch"
    batch = await batch_requests(a.port, a.batches, a.batch_size, 4)
    label = f"POST /enqueue/batch, {a.batch_size}/request"
    add(w, label, batch["tasks_per_s"], "tasks/s", ">= 10000")
    add(w, "  errors", batch["errors"], "")
    client = await python_client(sandbox.settings, a.client_tasks, 256)
    add(w, "Python client, 256 concurrent enqueue()", client["tasks_per_s"], "tasks/s")
    many = await Client.connect(sandbox.settings)
    started = time.perf_counter()
    await enqueue_chunks(many, "demo.noop", a.client_tasks)
    rate = a.client_tasks / (time.perf_counter() - started)
    await many.close()
    add(w, "Python client, enqueue_many(500) x 4 concurrent", rate, "tasks/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--client-tasks", type=int, default=20000)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument(
        "--profile", help="write a py-spy profile of the API over the whole run to this file"
    )
    args = parser.parse_args()

    sandbox = Sandbox(args.port)
    figures: list[Figure] = []
    started = time.monotonic()
    try:
        await sandbox.open()
        await sandbox.start_api()
        assert sandbox.api is not None
        if args.profile:  # the bare app runs first: the API is idle meanwhile
            py_spy = str(Path(sys.executable).parent / "py-spy")
            command = [py_spy, "record", "--format", "raw", "-o", args.profile]
            command += ["--pid", str(sandbox.api.pid)]
            profiler = subprocess.Popen(command)  # noqa: ASYNC220 - started before measuring
        await enqueue_workloads(sandbox, args, lambda *f: figures.append(Figure(*f)))
        if args.profile:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            await asyncio.to_thread(profiler.wait, 30)
    finally:
        await sandbox.close()
    report("taskq enqueue bench", [figures], [time.monotonic() - started])


if __name__ == "__main__":
    asyncio.run(main())
