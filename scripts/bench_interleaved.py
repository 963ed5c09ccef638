"""Interleaved A/B: the code of commit REF against this checkout, round by round.

On a shared machine the rates move a lot within minutes, so one run of each
side after the other (as ``scripts/bench-ab`` does) compares moments more than
code. Here each round runs both sides in alternating order, each on a fresh
API, database, namespace (and worker), and the table gives every round and the
medians, with each process's CPU. Workloads:

- ``enqueue``: single ``POST /enqueue`` from 32 connections (1 s of warm-up, then
  ``--seconds``), with the bare-ASGI reference first in every round;
- ``e2e``: end to end with one worker at concurrency 200, ``--tasks`` of
  ``demo.noop`` then as many of a sync handler (``--sync``, default the no-op
  ``demo.noop_sync``; ``bench.sleep_sync`` blocks its thread for 2 ms).

REF's ``taskq`` package is exported with ``git archive`` and put first on the
``PYTHONPATH`` of the API and the worker; everything else (the load generator,
the bare app, the benchmark's handlers) is this checkout's, and so is
``taskq.sql`` (the editable install maps it to ``sql/``): REF's ``sql/`` must be
the same. Run it under the benchmark lock:

    /work/wt/heavy .venv/bin/python scripts/bench_interleaved.py REF enqueue [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable

from bench import Bench
from bench_enqueue import BARE_PORT_OFFSET, _single
from benchlib import Sandbox, stop

from taskq.client import Client

CPU = ("api", "app", "bench", "postgres", "rabbitmq")
BARE = "bare ASGI app"
HERE = "this checkout"
Figures = dict[str, float]


async def enqueue(args: argparse.Namespace) -> Figures:
    """Single POST /enqueue against a fresh API: rate, latency, CPU ms per request."""
    sandbox = Sandbox(args.port)
    try:
        await sandbox.open()
        await sandbox.start_api()
        assert sandbox.api is not None
        figures = await _single(args.port, 32, args.seconds, {"api": sandbox.api.pid})
    finally:
        await sandbox.close()
    return _per_request(figures)


async def bare(args: argparse.Namespace) -> Figures:
    app = await Sandbox(args.port).start_bare(args.port + BARE_PORT_OFFSET)
    try:
        figures = await _single(args.port + BARE_PORT_OFFSET, 32, args.seconds, {"app": app.pid})
    finally:
        stop([app])
    return _per_request(figures)


def _per_request(figures: Figures) -> Figures:
    """Each process's CPU seconds as milliseconds per request."""
    return {k: v * 1000 / figures["requests"] if k in CPU else v for k, v in figures.items()}


async def end_to_end(args: argparse.Namespace) -> Figures:
    """``demo.noop`` then ``demo.noop_sync`` end to end on a fresh API and worker."""
    bench = Bench(argparse.Namespace(port=args.port, tasks=args.tasks, profile=None))
    sandbox = bench.sandbox
    try:
        await sandbox.open()
        await sandbox.start_api()
        sandbox.start_workers(1, 200, 200)
        await sandbox.wait_consumers(1)
        await asyncio.sleep(0.5)
        client = await Client.connect(sandbox.settings)
        try:
            rate = await bench.end_to_end(client, "async", "demo.noop", "")
            sync = await bench.end_to_end(client, "sync", args.sync, "")
        finally:
            await client.close()
    finally:
        await sandbox.close()
    shown = {(f.workload, f.name.strip()): f.value for f in bench.figures}
    return {
        "async tasks/s": rate,
        "sync tasks/s": sync,
        "sync / async": sync / rate,
        "async worker CPU s/1000": shown["async", "worker CPU per 1000 tasks"],
        "sync worker CPU s/1000": shown["sync", "worker CPU per 1000 tasks"],
        "sync rows/claim": shown["sync", "rows per claim statement, mean"],
        "sync rows/complete": shown["sync", "rows per complete statement, mean"],
    }


async def on_code(code: str | None, run: Callable[[], Awaitable[Figures]]) -> Figures:
    """``run()`` with the API's and workers' ``taskq`` from directory ``code`` (None: here)."""
    before = os.environ.get("PYTHONPATH")
    if code is not None:  # a Sandbox passes PYTHONPATH on to its processes
        os.environ["PYTHONPATH"] = code
    try:
        return await run()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


async def compare(args: argparse.Namespace, code: str) -> None:
    measure = enqueue if args.workload == "enqueue" else end_to_end
    runs: dict[str, list[Figures]] = {BARE: []} if args.workload == "enqueue" else {}
    runs.update({args.ref: [], HERE: []})
    for n in range(args.rounds):
        if BARE in runs:
            runs[BARE].append(await bare(args))
        order = [(args.ref, code), (HERE, None)]
        for side, where in order if n % 2 == 0 else order[::-1]:
            runs[side].append(await on_code(where, lambda: measure(args)))
        for side, figures in runs.items():
            print(f"round {n + 1}  {side:16} {_line(figures[-1])}", flush=True)
    print(f"--- medians of {args.rounds} rounds")
    for side, figures in runs.items():
        medians = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
        print(f"{side:26} {_line(medians)}")
    if BARE in runs:
        for side in (args.ref, HERE):
            pairs = list(zip(runs[side], runs[BARE], strict=True))
            rate = statistics.median(f["requests_per_s"] / b["requests_per_s"] for f, b in pairs)
            p99 = statistics.median(f["p99_ms"] / b["p99_ms"] for f, b in pairs)
            print(f"{side} / bare app, same round, median: rate {rate:.2f}x, p99 {p99:.2f}x")


def _line(figures: Figures) -> str:
    return "  ".join(f"{k} {v:.3f}" if v < 100 else f"{k} {v:.0f}" for k, v in figures.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ref", help="the commit to compare this checkout with")
    parser.add_argument("workload", choices=["enqueue", "e2e"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="enqueue: measured seconds")
    parser.add_argument("--tasks", type=int, default=4000, help="e2e: tasks of each handler")
    parser.add_argument("--sync", default="demo.noop_sync", help="e2e: the sync task type")
    parser.add_argument("--port", type=int, default=18990)
    args = parser.parse_args()
    if subprocess.run(["git", "diff", "--quiet", args.ref, "--", "sql"]).returncode:
        raise SystemExit(f"{args.ref}'s sql/ differs from this checkout's: see the docstring")
    with tempfile.TemporaryDirectory(prefix="taskq-ab-") as code:
        archive = subprocess.run(
            ["git", "archive", args.ref, "taskq"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", code], input=archive, check=True)
        asyncio.run(compare(args, code))


if __name__ == "__main__":
    main()
