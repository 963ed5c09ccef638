"""Schedule lateness: how long after its fire time a schedule's task is enqueued.

Starts K worker processes (their elected sweeper fires the schedules) against a
fresh database and namespace, declares S schedules that fire every second
(``every`` 1 s, ``demo.noop``), lets them run, and reads each fire's lateness
from the rows: the task's ``created_at`` (its insert's transaction start) minus
the fire time its idempotency key names. Also checks that every fire between
the first and the last was enqueued exactly once. Prints a table and JSON lines.

    .venv/bin/python scripts/bench_schedules.py [--seconds 60] [--schedules 5] [--workers 2]
        [--kill-every SECONDS]

With ``--kill-every``, a worker (in turn, so the sweeper's process among them) is
SIGKILLed that often and another started: the fires must still each be enqueued
once (the schedules catch up ``all``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from datetime import datetime, timedelta

from benchlib import Sandbox, percentile

from taskq.fleet.schedules import schedule_spec


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--schedules", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=18_600)
    parser.add_argument(
        "--kill-every",
        type=float,
        default=0.0,
        help="SIGKILL one worker (in turn) every this many seconds and start another",
    )
    args = parser.parse_args()

    sandbox = Sandbox(args.port)
    try:
        await sandbox.open()
        sandbox.start_workers(args.workers)
        await sandbox.wait_consumers(args.workers)
        from taskq.store import Store

        store = await Store.connect(sandbox.database_url, min_size=1, max_size=2)
        try:
            now = await store.database_now()
            for n in range(args.schedules):
                spec, _ = schedule_spec(
                    f"pulse-{n}", {"every": 1, "type": "demo.noop", "catch_up": "all"}
                )
                await store.put_schedule(
                    spec, now.replace(microsecond=0) + timedelta(seconds=2), max_schedules=1000
                )
        finally:
            await store.close()
        kills = await run_for(sandbox, args.seconds, args.kill_every)
        rows = await sandbox.db.fetch(
            "SELECT idempotency_key, created_at FROM taskq.tasks"
            " WHERE idempotency_key LIKE 'schedule:%'"
        )
    finally:
        await sandbox.close()

    lateness: list[float] = []
    fires: dict[str, list[datetime]] = {}
    for row in rows:
        _, name, stamp = row["idempotency_key"].split(":", 2)
        fire = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=row["created_at"].tzinfo
        )
        fires.setdefault(name, []).append(fire)
        lateness.append((row["created_at"] - fire).total_seconds() * 1000)
    gaps = 0
    for times in fires.values():
        times.sort()
        expected = int((times[-1] - times[0]).total_seconds()) + 1
        gaps += expected - len(set(times))
    figures = {
        "workers killed": (kills, ""),
        "fires": (len(lateness), ""),
        "fires missing between the first and last of each schedule": (gaps, ""),
        "lateness p50": (percentile(lateness, 0.50), "ms"),
        "lateness p99": (percentile(lateness, 0.99), "ms"),
        "lateness max": (max(lateness), "ms"),
    }
    for figure, (value, unit) in figures.items():
        print(f"{figure:<60} {value:>10.1f} {unit}")
    for figure, (value, unit) in figures.items():
        print(json.dumps({"bench": "schedules", "figure": figure, "value": value, "unit": unit}))


async def run_for(sandbox: Sandbox, seconds: float, kill_every: float) -> int:
    """Let the schedules fire for ``seconds``, killing a worker every ``kill_every``
    seconds (0: never) and starting another; returns how many it killed."""
    if kill_every <= 0:
        await asyncio.sleep(seconds)
        return 0
    kills = 0
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() + kill_every < deadline:
        await asyncio.sleep(kill_every)
        turn = kills % len(sandbox.workers)
        victim, rest = sandbox.workers[turn], sandbox.workers[turn + 1 :]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        # The new worker takes the victim's place, and so its metrics port.
        sandbox.workers = sandbox.workers[:turn]
        sandbox.start_workers(1)
        sandbox.workers += rest
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
    return kills


if __name__ == "__main__":
    asyncio.run(main())
