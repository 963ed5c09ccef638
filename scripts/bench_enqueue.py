"""Enqueue benchmark: single POST /enqueue at N concurrent clients, batch enqueue, Python client.

Starts `taskq api` itself against a fresh database and namespace on the local
Postgres and RabbitMQ, prints a table and one JSON line per figure, and cleans up.
`scripts/bench` runs the same workloads and more.

    .venv/bin/python scripts/bench_enqueue.py [--seconds 10] [--clients 32] [--batches 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

from benchlib import Sandbox, batch_requests, python_client, single_requests


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

    sandbox = Sandbox(args.port)
    results: dict[str, dict[str, float]] = {}
    try:
        await sandbox.open()
        await sandbox.start_api()
        assert sandbox.api is not None
        await single_requests(args.port, args.clients, 1.0)  # warm up
        if args.profile:
            py_spy = str(Path(sys.executable).parent / "py-spy")
            command = [py_spy, "record", "--format", "raw", "-o", args.profile]
            command += ["--pid", str(sandbox.api.pid), "--duration", str(int(args.seconds))]
            subprocess.Popen(command)  # noqa: ASYNC220 - started once, before the measurement
        results["single"] = await single_requests(args.port, args.clients, args.seconds)
        results["batch"] = await batch_requests(args.port, args.batches, args.batch_size, 4)
        results["python_client"] = await python_client(sandbox.settings, args.client_tasks, 256)
        unpublished = await sandbox.db.fetchval(
            "SELECT count(*) FROM tasks WHERE published_at IS NULL"
        )
        results["after"] = {"unpublished_rows": float(unpublished)}
    finally:
        await sandbox.close()

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
