"""What unique enqueues cost: single ``POST /enqueue`` from N clients, four kinds in turn.

Starts ``taskq api`` against a fresh database and namespace, then sends, for
``--seconds`` each (after a second of warm-up): plain enqueues; unique ones whose
every key is new (``"key": "$"``, payloads that differ); duplicates of one key;
and debounced ones of one key (``on_conflict: replace``, a minute's delay). Prints
each kind's request rate, the API's and Postgres's CPU per 1000 requests and the
status codes, then cleans up.

    .venv/bin/python scripts/bench_unique.py [--seconds 6] [--clients 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from benchlib import HttpConnection, Sandbox, cpu_now

Body = Callable[[int, int, int], dict[str, Any]]
NOOP = "demo.noop"
KINDS: dict[str, Body] = {
    "plain": lambda c, i, run: {"type": NOOP, "payload": {"c": c, "i": i, "run": run}},
    "unique, every key new": lambda c, i, run: {
        "type": NOOP, "payload": {"c": c, "i": i, "run": run}, "unique": {"key": "$"},
    },
    "unique, one key (duplicates)": lambda c, i, run: {
        "type": NOOP, "payload": {"run": run}, "unique": {"key": "$"},
    },
    "debounce, one key (replace)": lambda c, i, run: {
        "type": NOOP, "payload": {"run": run, "i": i}, "delay": 60,
        "unique": {"key": "$.run", "while": "queued", "on_conflict": "replace"},
    },
}  # fmt: skip


async def send(port: int, body: Body, run: int, clients: int, seconds: float) -> Counter[int]:
    """``clients`` connections posting ``body(client, i, run)`` for ``seconds``: the codes."""
    codes: Counter[int] = Counter()
    stop_at = time.perf_counter() + seconds

    async def client(c: int) -> None:
        conn = HttpConnection("127.0.0.1", port)
        await conn.open()
        i = 0
        while time.perf_counter() < stop_at:
            status, _ = await conn.post("/enqueue", json.dumps(body(c, i, run)).encode())
            codes[status] += 1
            i += 1
        conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    return codes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=18_991)
    args = parser.parse_args()
    sandbox = Sandbox(args.port)
    run = 0
    try:
        await sandbox.open()
        await sandbox.start_api()
        assert sandbox.api is not None
        pids = {"api": sandbox.api.pid}
        print(f"{'round':5} {'kind':30} {'req/s':>7} {'API CPU':>8} {'PG CPU':>7}  codes")
        for round_ in range(1, args.rounds + 1):
            for name, body in KINDS.items():
                run += 1
                await send(args.port, body, run, args.clients, 1.0)  # warm-up (its own keys)
                run += 1
                before, started = cpu_now(pids), time.perf_counter()
                codes = await send(args.port, body, run, args.clients, args.seconds)
                elapsed, after = time.perf_counter() - started, cpu_now(pids)
                count = sum(codes.values())
                api, pg = ((after[k] - before[k]) * 1000 / count for k in ("api", "postgres"))
                print(
                    f"{round_:5} {name:30} {count / elapsed:7.0f} {api:7.3f}s {pg:6.3f}s"
                    f"  {dict(codes)}",
                    flush=True,
                )
    finally:
        await sandbox.close()


if __name__ == "__main__":
    asyncio.run(main())
