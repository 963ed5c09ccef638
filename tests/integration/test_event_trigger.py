"""The update trigger's cost grows with the rows a statement changes, not with their square.

PL/pgSQL caches the plan of the trigger's join of its transition tables. Planned
for small statements as a nested loop, it compared every new row with every old
one when a later statement of the same connection changed thousands of rows.
Counting work, not time: the join's plan must not be a nested loop after a
connection's small statements.
"""

from __future__ import annotations

import asyncpg
import pytest

pytestmark = pytest.mark.integration


async def test_a_large_update_after_small_ones_still_hashes_the_transition_tables(
    db: asyncpg.Connection,
) -> None:
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, run_at)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60, now()"
        " FROM generate_series(1, 2000)"
    )
    ids = [r["id"] for r in await db.fetch("SELECT id FROM tasks ORDER BY id")]
    claim = await db.prepare(
        "UPDATE tasks SET status = 'RUNNING', attempts = attempts + 1, worker_id = 'w',"
        " lease_expires_at = now() + interval '1 minute' WHERE id = ANY($1::uuid[])"
    )
    for n in range(8):  # small statements first: the trigger's plan is cached from these
        await claim.fetch(ids[n : n + 1])
    await db.execute("LOAD 'auto_explain'")
    await db.execute("SET auto_explain.log_min_duration = 0")
    await db.execute("SET auto_explain.log_nested_statements = on")
    await db.execute("SET client_min_messages = log")
    await db.execute("SET auto_explain.log_level = notice")
    plans: list[str] = []
    db.add_log_listener(lambda _, message: plans.append(str(message)))
    await claim.fetch(ids[8:])
    inserts = [p for p in plans if "INSERT INTO task_events" in p]
    assert inserts, plans
    assert all("Nested Loop" not in p for p in inserts), inserts[0]
    events = await db.fetchval("SELECT count(*) FROM task_events WHERE status = 'RUNNING'")
    assert events == len(ids)
