"""What the partitioned task history costs the statements that write it (issue #19).

Every status change of a task writes a row of ``task_events`` (the tasks
triggers), so the history is on the hot path: migration 0021 made it a table
partitioned by time, and each of those inserts is now routed to a partition.
This probe runs the same statements on two fresh databases, one migrated up to
0020 (the history one table) and one to the latest migration (partitioned):
``--batches`` rounds of an insert of ``--size`` tasks, their claim (RUNNING) and
their outcome (SUCCEEDED), each statement its own transaction, as a worker's
batches are. It alternates the two databases ``--rounds`` times and prints the
seconds of each round and the median of all rounds but the first (a warm-up).

    .venv/bin/python scripts/bench_history.py [--size 30] [--batches 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg
import taskq.sql as sql
from benchlib import SERVER_URL, database_url

from taskq.migrate import migrate

INSERT = (
    "INSERT INTO taskq.tasks (id, type, queue, payload, max_attempts, timeout_seconds)"
    " SELECT gen_random_uuid(), 'probe.v1', 'default', '{}', 3, 30"
    " FROM generate_series(1, $1) RETURNING id"
)
CLAIM = (
    "UPDATE taskq.tasks SET status = 'RUNNING', attempts = 1, worker_id = 'probe',"
    " started_at = now(), lease_expires_at = now() + interval '1 minute' WHERE id = ANY($1)"
)
FINISH = (
    "UPDATE taskq.tasks SET status = 'SUCCEEDED', finished_at = now(), result = 'null'"
    " WHERE id = ANY($1)"
)


async def database(name: str, last_version: int | None) -> asyncpg.Connection:
    """A fresh database ``name`` migrated up to ``last_version`` (None: all of them)."""
    server = await asyncpg.connect(SERVER_URL)
    await server.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await server.close()
    everything = sql.migrations
    if last_version is not None:
        sql.migrations = lambda: [m for m in everything() if m.version <= last_version]
    try:
        await migrate(database_url(name))
    finally:
        sql.migrations = everything
    connection = await asyncpg.connect(database_url(name))
    await connection.execute(
        "INSERT INTO taskq.task_type (name, queue) VALUES ('probe.v1', 'default')"
    )
    return connection


async def one_round(connection: asyncpg.Connection, batches: int, size: int) -> float:
    await connection.execute("TRUNCATE taskq.tasks, taskq.task_events")
    began = time.perf_counter()
    for _ in range(batches):
        ids = [row["id"] for row in await connection.fetch(INSERT, size)]
        await connection.execute(CLAIM, ids)
        await connection.execute(FINISH, ids)
    return time.perf_counter() - began


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=30)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:6]
    names = {
        "one table (0020)": f"taskq_history_a_{suffix}",
        "partitioned": f"taskq_history_b_{suffix}",
    }
    connections = {
        "one table (0020)": await database(names["one table (0020)"], 20),
        "partitioned": await database(names["partitioned"], None),
    }
    took: dict[str, list[float]] = {label: [] for label in connections}
    try:
        for _ in range(args.rounds):
            for label, connection in connections.items():
                took[label].append(await one_round(connection, args.batches, args.size))
    finally:
        for connection in connections.values():
            await connection.close()
        server = await asyncpg.connect(SERVER_URL)
        for name in names.values():
            await server.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await server.close()
    tasks = args.batches * args.size
    for label, seconds in took.items():
        middle = statistics.median(seconds[1:] or seconds)
        print(
            f"{label:18} rounds {', '.join(f'{s:.3f}' for s in seconds)} s;"
            f" median {middle:.3f} s = {1000 * middle / tasks:.3f} ms a task"
        )


if __name__ == "__main__":
    asyncio.run(main())
