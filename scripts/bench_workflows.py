"""Workflows (issue #18): a fan-out of N tasks with a callback, from the enqueue call to the
callback's success, and a chain of M steps (the time to its last step's success per step),
on taskq at its defaults (one ``taskq worker``, no flags) and, with ``--peer celery``, on
Celery's chord and chain in the same run: one ``celery worker`` (no flags), the same
RabbitMQ, Postgres results (a chord needs a result backend; the app is
``scripts/peers/celery_canvas.py``).

Each workload reports each process's CPU seconds per 1,000 tasks (the callback counts
as a task; Celery's ``chord_unlock`` polls do not): the worker (with its children:
Celery's prefork pool), the enqueuer (taskq: this process, whose client also publishes
the roots' envelopes; Celery: its enqueuer process), Postgres and RabbitMQ.

The branches are ``demo.echo`` (``{"i": n}`` back) and the callback ``bench.collect``
(the number of results it got, checked); Celery's are ``bench.echo(i)`` and
``bench.collect(results)``; the chain's steps are ``demo.echo`` and Celery's
``bench.step(previous)``. The nodes get names: a group of thousands without names
takes a quadratic time to build (tests/unit/test_workflow_names.py).

    scripts/bench --workflows [--quick] [--peer celery] [--fan-out N] [--chain M] [--runs R]
    .venv/bin/python scripts/bench_workflows.py [the same options]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from bench_handlers import COLLECT
from bench_report import Figure, report
from benchlib import Sandbox, wait_consumers
from peers import count_marks
from peers.runner import Peer

from taskq.client import Client
from taskq.workflows import Signature, Step, chain, group

SCRIPTS = Path(__file__).resolve().parent
BRANCH = "demo.echo"
# A figure of one workload: (name, value, unit).
Add = Callable[[str, float, str], None]
# A figure: (workload, name, value, unit).
AddTo = Callable[[str, str, float, str], None]


def _processes() -> dict[int, tuple[int, int, float]]:
    """Every live process: pid -> (parent pid, uid, CPU seconds so far)."""
    found: dict[int, tuple[int, int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            uid = os.stat(entry.path).st_uid
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry.name)] = (int(fields[1]), uid, (int(fields[11]) + int(fields[12])) / tick)
    return found


def tree_cpu_seconds(root: int) -> float:
    """User plus system CPU seconds of process ``root`` and its live descendants."""
    found = _processes()
    total = 0.0
    for pid, (_, _, seconds) in found.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in found:
            ancestor = found[ancestor][0]
        if ancestor == root:
            total += seconds
    return total


class ServerCpu:
    """The CPU the servers spend on this benchmark, as far as a shared machine lets it be
    told apart: Postgres, the backends connected to the benchmark's database (each read
    at every :meth:`sample`, so one that exits keeps what it used until then); RabbitMQ,
    the broker's Erlang VM (the processes of the ``rabbitmq`` user: not the private
    nodes of fault tests), which other users of the broker share."""

    def __init__(self, db: asyncpg.Connection, database: str) -> None:
        self.db = db
        self.database = database
        self.backends: dict[int, float] = {}  # pid -> CPU seconds at its last reading
        self.first: dict[int, float] = {}  # pid -> CPU seconds at its first reading

    async def sample(self) -> None:
        pids = await self.db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database
        )
        for row in pids:
            try:
                seconds = _stat_seconds(row["pid"])
            except OSError:
                continue
            self.first.setdefault(row["pid"], seconds)
            self.backends[row["pid"]] = seconds

    async def now(self) -> dict[str, float]:
        """CPU seconds so far: Postgres (since each backend's first reading), RabbitMQ."""
        await self.sample()
        rabbit = pwd.getpwnam("rabbitmq").pw_uid if _has_user("rabbitmq") else -1
        broker = sum(
            seconds
            for pid, (_, uid, seconds) in _processes().items()
            if uid == rabbit and _command(pid) == "beam.smp"
        )
        postgres = sum(self.backends[p] - self.first[p] for p in self.backends)
        return {"postgres": postgres, "rabbitmq": broker}


def _stat_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _command(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.index("(") + 1 : stat.rindex(")")]


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


async def poll(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, servers: ServerCpu
) -> float:
    """Check every 20 ms until ``check`` is true (and read the servers' CPU every 0.5 s);
    the wall-clock time it was seen."""
    deadline = time.monotonic() + timeout
    polls = 0
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:g}s: {what}")
        polls += 1
        if polls % 25 == 0:
            await servers.sample()
        await asyncio.sleep(0.02)
    return time.time()


def add_cpu(add: Add, before: dict[str, float], after: dict[str, float], tasks: int) -> None:
    for part, label in (
        ("worker", "worker"),
        ("enqueuer", "enqueuer"),
        ("postgres", "Postgres"),
        ("rabbitmq", "RabbitMQ"),
    ):
        add(f"  {label} CPU per 1000 tasks", (after[part] - before[part]) * 1000 / tasks, "s")


# ---------------------------------------------------------------------- taskq


class TaskqSide:
    """taskq's workloads: one worker at its defaults on a fresh database and namespace."""

    def __init__(self, sandbox: Sandbox, client: Client) -> None:
        self.sandbox = sandbox
        self.client = client
        self.servers = ServerCpu(sandbox.db, sandbox.name)

    async def cpu(self) -> dict[str, float]:
        [worker] = self.sandbox.workers
        return {
            "worker": tree_cpu_seconds(worker.pid),
            "enqueuer": time.process_time(),
            **await self.servers.now(),
        }

    async def succeeded(self, task_id: uuid.UUID) -> bool:
        status = await self.sandbox.db.fetchval(
            "SELECT status FROM taskq.tasks WHERE id = $1", task_id
        )
        if status in ("FAILED", "CANCELLED"):
            raise RuntimeError(f"taskq: the workflow's last task is {status}")
        return bool(status == "SUCCEEDED")

    async def run(
        self, flow: Callable[[], Step], last: str, timeout: float
    ) -> tuple[float, float, Any]:
        """Enqueue ``flow()`` (built after the clock starts); wait until node ``last``
        SUCCEEDED. Returns (seconds in all, seconds of the enqueue call, its result)."""
        first = time.time()
        result = await self.client.enqueue_workflow(flow())
        enqueued = time.time()
        task_id = result.tasks[last]
        what = f"taskq: {last} SUCCEEDED"
        end = await poll(lambda: self.succeeded(task_id), timeout, what, self.servers)
        value = await self.sandbox.db.fetchval(
            "SELECT result FROM taskq.tasks WHERE id = $1", task_id
        )
        return end - first, enqueued - first, json.loads(value)

    async def fan_out(self, n: int, add: Add) -> None:
        def flow() -> Step:
            branches = [Signature(BRANCH, {"i": i}, name=f"b{i}") for i in range(n)]
            return group(branches).then(Signature(COLLECT, {}, name="callback"))

        before = await self.cpu()
        took, enqueue, got = await self.run(flow, "callback", max(300.0, n / 20))
        after = await self.cpu()
        if got != n:
            raise RuntimeError(f"taskq: the callback got {got} results, not {n}")
        add(f"taskq: fan-out of {n} + callback, enqueue -> callback SUCCEEDED", took, "s")
        add("  of which the enqueue call", enqueue, "s")
        add("  tasks per second", (n + 1) / took, "tasks/s")
        add_cpu(add, before, after, n + 1)

    async def chain(self, m: int, add: Add) -> None:
        def flow() -> Step:
            return chain(*(Signature(BRANCH, {"i": i}, name=f"s{i}") for i in range(m)))

        before = await self.cpu()
        took, _, got = await self.run(flow, f"s{m - 1}", max(300.0, m / 2))
        after = await self.cpu()
        if got != {"i": m - 1}:
            raise RuntimeError(f"taskq: the chain's last step returned {got}")
        add(f"taskq: chain of {m}, enqueue -> last step SUCCEEDED", took, "s")
        add("  per step", took * 1000 / m, "ms")
        add_cpu(add, before, after, m)


async def taskq_workloads(args: argparse.Namespace, add: AddTo, sandbox: Sandbox) -> None:
    sandbox.start_workers(1)  # taskq's defaults: no --concurrency, no --prefetch
    await sandbox.wait_consumers(1)
    await asyncio.sleep(0.5)
    client = await Client.connect(sandbox.settings)
    try:
        side = TaskqSide(sandbox, client)
        await side.fan_out(args.fan_out, lambda name, v, u: add("1 fan-out", name, v, u))
        await side.chain(args.chain, lambda name, v, u: add("2 chain", name, v, u))
    finally:
        await client.close()
    sandbox.stop_workers()  # the peer gets the machine to itself


# ---------------------------------------------------------------------- Celery


async def celery_workloads(args: argparse.Namespace, add: AddTo, database_url: str) -> None:
    """Celery's chord and chain: one ``celery worker`` at its defaults, Postgres results.
    A workload that fails says so on stderr and gets NaN figures."""
    peer = Peer("celery+pg", 1, 0, database_url, defaults=True)
    peer.module = "peers.celery_canvas"
    marks = os.path.join(peer.dir, "marks")
    try:
        peer.start_workers(marks)
        await wait_consumers(peer.queue, 1, 60)
        await asyncio.sleep(0.5)
        db = await asyncpg.connect(database_url)
        try:
            for shape, count, workload in (
                ("chord", args.fan_out, "1 fan-out"),
                ("chain", args.chain, "2 chain"),
            ):
                try:
                    await celery_workload(peer, db, marks, shape, count, workload, add)
                except RuntimeError as exc:
                    print(f"bench: Celery's {shape} failed: {exc}", file=sys.stderr, flush=True)
                    add(workload, f"Celery: {shape} of {count} failed", float("nan"), "s")
        finally:
            await db.close()
    finally:
        await peer.close()


async def celery_workload(
    peer: Peer, db: asyncpg.Connection, marks: str, shape: str, n: int, workload: str, add: AddTo
) -> None:
    worker = peer.processes[0]
    done_before = count_marks(marks)

    servers = ServerCpu(db, urlsplit(peer.database_url).path.lstrip("/"))

    async def cpu(enqueuer: float = 0.0) -> dict[str, float]:
        return {"worker": tree_cpu_seconds(worker.pid), "enqueuer": enqueuer, **await servers.now()}

    before = await cpu()
    command = [sys.executable, "-m", peer.module, shape, str(n)]
    env = dict(peer.env, BENCH_PEER_MARKS=marks)
    enqueuer = subprocess.Popen(  # noqa: ASYNC220 - its output is awaited in a thread
        command, env=env, cwd=SCRIPTS, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.to_thread(enqueuer.communicate)
    if enqueuer.returncode:
        raise RuntimeError(f"the enqueuer exited {enqueuer.returncode}")
    first, task_id, enqueuer_cpu = out.decode().split()
    tasks = n + 1 if shape == "chord" else n

    async def succeeded() -> bool:
        if worker.poll() is not None:
            raise RuntimeError("the worker exited")
        status = await db.fetchval("SELECT status FROM celery_taskmeta WHERE task_id = $1", task_id)
        if status == "FAILURE":
            raise RuntimeError("the last task failed")
        return bool(status == "SUCCESS")

    timeout = max(600.0, n / 5)
    try:
        end = await poll(succeeded, timeout, f"Celery's {shape}: its last task SUCCESS", servers)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} ({count_marks(marks) - done_before} of {tasks} ran)") from None
    after = await cpu(float(enqueuer_cpu))
    took = end - float(first)
    if shape == "chord":
        add(workload, f"Celery: chord of {n} + callback, apply -> callback SUCCESS", took, "s")
        add(workload, "  tasks per second", tasks / took, "tasks/s")
    else:
        add(workload, f"Celery: chain of {n}, apply -> last step SUCCESS", took, "s")
        add(workload, "  per step", took * 1000 / n, "ms")
    add_cpu(lambda name, v, u: add(workload, name, v, u), before, after, tasks)


# ---------------------------------------------------------------------- the run


async def run_once(args: argparse.Namespace) -> list[Figure]:
    figures: list[Figure] = []

    def add(workload: str, name: str, value: float, unit: str) -> None:
        figures.append(Figure(workload, name, value, unit))

    sandbox = Sandbox(args.port)
    try:
        await sandbox.open()
        await taskq_workloads(args, add, sandbox)
        if "celery" in args.peer:
            await celery_workloads(args, add, sandbox.database_url)
    finally:
        await sandbox.close()
    for workload in ("1 fan-out", "2 chain"):
        ours = [f for f in figures if f.workload == workload and f.name.startswith("taskq")]
        theirs = [f for f in figures if f.workload == workload and f.name.startswith("Celery")]
        if ours and theirs:
            add(workload, "Celery / taskq (higher: taskq faster)", theirs[0].value / ours[0].value,
                "x")  # fmt: skip
    figures.sort(key=lambda f: f.workload)  # stable: taskq, Celery, the ratio
    return figures


def header(args: argparse.Namespace) -> str:
    peers = "Celery 5 chord and chain, one `celery worker` (no flags), Postgres results"
    return (
        f"taskq bench --workflows: fan-out {args.fan_out} + callback, chain {args.chain};"
        f" taskq: one `taskq worker` (no flags); {os.cpu_count()} CPUs; peer:"
        f" {peers if 'celery' in args.peer else 'none'}; load average at the end (1, 5, 15"
        f" min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


def run_workflows(args: argparse.Namespace) -> None:
    """Run the workloads ``args.runs`` times and print the table (``scripts/bench --workflows``)."""
    if "dramatiq" in args.peer:
        print("bench: --workflows has no Dramatiq peer (its group callbacks need Redis)")
    args.fan_out = args.fan_out or (500 if args.quick else 10_000)
    args.chain = args.chain or (100 if args.quick else 1000)
    runs: list[list[Figure]] = []
    seconds: list[float] = []
    for n in range(args.runs):
        started = time.monotonic()
        runs.append(asyncio.run(run_once(args)))
        seconds.append(time.monotonic() - started)
        if args.runs > 1:
            print(f"--- run {n + 1} of {args.runs}")
            report(header(args), runs[-1:], seconds[-1:])
    if args.runs > 1:
        print(f"--- median of {args.runs} runs")
    report(header(args), runs, seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the workflow workloads (also ``scripts/bench``'s)."""
    parser.add_argument("--fan-out", type=int, help="branches (default 10000, quick 500)")
    parser.add_argument("--chain", type=int, help="chain steps (default 1000, quick 100)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--peer", action="append", default=[], choices=["celery", "dramatiq"])
    parser.add_argument("--runs", type=int, default=1, help="repeat, then print medians too")
    parser.add_argument("--port", type=int, default=18940)
    add_arguments(parser)
    run_workflows(parser.parse_args())


if __name__ == "__main__":
    main()
