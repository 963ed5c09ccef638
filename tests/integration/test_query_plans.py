"""Statements given a list of task ids reach the tasks through the primary key,
whatever the statistics say.

Written as ``id = ANY($1)`` next to conditions that a partial index matches
(``published_at IS NULL AND status IN (...)``), Postgres may scan that index
and test every row it holds against the whole list: with a backlog of owed
rows (a broker outage, a burst of enqueues the relay takes over) each batch
then costs rows x ids comparisons. The table here is analysed while empty, as
a fresh or quickly grown table is, which is when the planner makes that choice.

The same choice made the outcome statements (complete, retry, fail, ...) scan
every entry of the partial index of RUNNING tasks, dead ones included until a
vacuum, for each batch: the longer a busy worker ran, the longer each took. The
statements that lock the rows they change therefore find each id through the
primary key, one lookup per id (a LATERAL subquery), in id order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from taskq import sql

pytestmark = pytest.mark.integration

BACKLOG = 3000
TOKENS = [uuid.uuid4() for _ in range(200)]

# Each statement that takes a list of ids, with the arguments besides the list.
STATEMENTS: dict[str, tuple[Any, ...]] = {
    "publish_owed_ids": (),
    "republish": (),
    "requeue": (["FAILED", "CANCELLED"],),
    "heartbeat": ("w1", 30.0, "host", 1, ["default"], 1, 1, 5.0, TOKENS),
    "mark_published": ([0] * 200,),
    "set_aside": ([0] * 200, ["unroutable"] * 200, 30.0, 600.0),
    "claim": ("w1", 30.0),
    "claim_gated": ("w1", 30.0, 1.25, 0.5),
    "complete": (TOKENS, ["null"] * 200),
    "retry": (TOKENS, ["boom"] * 200, [1.0] * 200),
    "fail": (TOKENS, ["boom"] * 200),
    "give_back": (TOKENS,),
    "cancel_running": (TOKENS,),
    "enqueue_replace": (["{}"] * 200, [None] * 200, [0.0] * 200),
    "enqueue_unique_release": (),
    "wait_request": (),
    "slots_handoff": ("w1", 30.0, ["default"], 200),
    "workflow_cancel_nodes": (),
}
# Those that lock what they change: only ever through the primary key.
THROUGH_THE_KEY = {"republish", "requeue", "heartbeat", "mark_published", "claim", "claim_gated",
                   "complete", "retry", "fail", "give_back", "cancel_running", "set_aside",
                   "enqueue_replace", "enqueue_unique_release", "wait_request",
                   "workflow_cancel_nodes"}  # fmt: skip


def scans(plan: dict[str, Any]) -> list[str]:
    """How each node of a JSON plan tree reads the tasks table: a sequential scan,
    or the index it uses (the modified table itself is not a read)."""
    found = []
    if plan.get("Relation Name") == "tasks" and plan["Node Type"] != "ModifyTable":
        if plan["Node Type"] == "Seq Scan":
            found.append("Seq Scan")
        elif "Index Name" in plan:
            found.append(plan["Index Name"])
    if plan["Node Type"] == "Bitmap Index Scan" and plan["Index Name"].startswith("tasks"):
        found.append(plan["Index Name"])
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


def filters(plan: dict[str, Any]) -> list[str]:
    """Every row filter of a JSON plan tree, with the relation it applies to."""
    found = []
    if "Filter" in plan:
        found.append(f"{plan.get('Relation Name')}: {plan['Filter']}")
    for child in plan.get("Plans", []):
        found += filters(child)
    return found


@pytest.mark.parametrize("query", sorted(STATEMENTS))
async def test_id_lists_are_never_a_per_row_filter(db: asyncpg.Connection, query: str) -> None:
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute("ANALYZE tasks")
    for status in ("ENQUEUED", "RUNNING"):  # both partial indexes hold thousands
        await db.execute(
            "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, run_at,"
            " status, attempts, worker_id, claim_token, lease_expires_at)"
            " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60, now(), $2,"
            " CASE WHEN $2 = 'RUNNING' THEN 1 ELSE 0 END,"
            " CASE WHEN $2 = 'RUNNING' THEN 'w1' END,"
            " CASE WHEN $2 = 'RUNNING' THEN gen_random_uuid() END,"
            " CASE WHEN $2 = 'RUNNING' THEN now() + interval '1 minute' END"
            " FROM generate_series(1, $1)",
            BACKLOG,
            status,
        )
    ids = [r["id"] for r in await db.fetch("SELECT id FROM tasks ORDER BY random() LIMIT 200")]
    # A prepared statement is planned for its values at first, then may switch
    # to a generic plan: neither may test rows against the list.
    for mode in ("force_custom_plan", "force_generic_plan"):
        async with db.transaction():
            await db.execute(f"SET LOCAL plan_cache_mode = {mode}")
            statement = await db.prepare("EXPLAIN (FORMAT JSON) " + sql.queries()[query])
            (plan,) = json.loads(await statement.fetchval(ids, *STATEMENTS[query]))
        per_row = [f[:80] for f in filters(plan["Plan"]) if "id = ANY" in f]
        assert per_row == [], f"{query} ({mode}) tests each row against the id list: {per_row}"
        if query in THROUGH_THE_KEY:
            reads = scans(plan["Plan"])
            assert reads and set(reads) == {"tasks_pkey"}, (query, mode, reads)


@pytest.mark.parametrize("status", ["FAILED", "CANCELLED"])
async def test_rare_failures_are_listed_through_their_own_index(
    db: asyncpg.Connection, status: str
) -> None:
    # A few failures among many successes: the listing must find them through an
    # index of failures, not walk every newer success (or the whole table).
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
        " attempts, finished_at, created_at)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60,"
        " CASE WHEN g % 1000 = 0 THEN $2 ELSE 'SUCCEEDED' END, 1, now(),"
        " now() - make_interval(secs => $1 - g)"
        " FROM generate_series(1, $1) g",
        BACKLOG * 10,
        status,
    )
    await db.execute("ANALYZE tasks")
    async with db.transaction():
        await db.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        statement = await db.prepare("EXPLAIN (FORMAT JSON) " + sql.queries()["tasks_list"])
        (plan,) = json.loads(
            await statement.fetchval(
                [status], None, None, None, None, None, None, None, 50, False, False
            )
        )
    reads = scans(plan["Plan"])
    assert reads and not {"Seq Scan", "tasks_created_keyset"} & set(reads), reads


async def test_rows_set_aside_are_not_in_the_relays_way(db: asyncpg.Connection) -> None:
    # Thousands of owed rows set aside, older than the few that are due: the relay's
    # pass reads the due ones through an index that holds none of the others.
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds,"
        " updated_at, set_aside_generation, publish_retry_at)"
        " SELECT gen_random_uuid(), 'demo.noop', 'gone', '{}', 3, 60,"
        " now() - interval '1 hour', 0, now() + interval '10 minutes'"
        " FROM generate_series(1, $1)",
        BACKLOG,
    )
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, updated_at)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60,"
        " now() - interval '1 minute' FROM generate_series(1, 10)"
    )
    await db.execute("ANALYZE tasks")
    for query, args in (("publish_owed", (5.0, 500)), ("publish_set_aside_due", (50,))):
        statement = await db.prepare("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.queries()[query])
        (plan,) = json.loads(await statement.fetchval(*args))
        wanted = "tasks_publish_due" if query == "publish_owed" else "tasks_publish_set_aside"
        assert scans(plan["Plan"]) == [wanted], (query, scans(plan["Plan"]))
        assert "Rows Removed by Filter" not in json.dumps(plan), query
    rows = await db.fetch(sql.queries()["publish_owed"], 5.0, 500)
    assert len(rows) == 10


async def test_the_holders_of_unique_keys_are_found_through_their_index(
    db: asyncpg.Connection,
) -> None:
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute("ANALYZE tasks")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds,"
        " unique_key, unique_while)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60,"
        " 'demo.noop/k' || n, (ARRAY['queued', 'active', 'until_finished'])[n % 3 + 1]"
        " FROM generate_series(1, $1) AS n",
        BACKLOG,
    )
    keys = [f"demo.noop/k{n}" for n in range(1, 201)]
    for mode in ("force_custom_plan", "force_generic_plan"):
        async with db.transaction():
            await db.execute(f"SET LOCAL plan_cache_mode = {mode}")
            statement = await db.prepare(
                "EXPLAIN (FORMAT JSON) " + sql.queries()["enqueue_unique_holders"]
            )
            (plan,) = json.loads(await statement.fetchval(keys))
        assert scans(plan["Plan"]) == ["tasks_unique_holder"], mode


async def test_waiting_tasks_are_listed_through_their_own_index(db: asyncpg.Connection) -> None:
    # A few WAITING tasks among many successes (taskq.tasks_waiting_created).
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
        " attempts, finished_at, created_at, wait_reason)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60,"
        " CASE WHEN g % 1000 = 0 THEN 'WAITING' ELSE 'SUCCEEDED' END, 0,"
        " CASE WHEN g % 1000 = 0 THEN NULL ELSE now() END,"
        " now() - make_interval(secs => $1 - g),"
        " CASE WHEN g % 1000 = 0 THEN 'paused' END"
        " FROM generate_series(1, $1) g",
        BACKLOG * 10,
    )
    await db.execute("ANALYZE tasks")
    async with db.transaction():
        await db.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        statement = await db.prepare("EXPLAIN (FORMAT JSON) " + sql.queries()["tasks_list"])
        (plan,) = json.loads(
            await statement.fetchval(
                ["WAITING"], None, None, None, None, None, None, None, 50, False, False
            )
        )
    reads = scans(plan["Plan"])
    assert reads and not {"Seq Scan", "tasks_created_keyset"} & set(reads), reads


async def test_stats_of_a_large_history_read_no_success(db: asyncpg.Connection) -> None:
    # Many successes, a few tasks of each other status: with SUCCEEDED estimated, the
    # counts read each other status through its partial index, never the table.
    await db.execute("INSERT INTO task_type (name, queue) VALUES ('demo.noop', 'default')")
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
        " attempts, finished_at, lease_expires_at, worker_id, wait_reason)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60, s.status,"
        " CASE WHEN s.status = 'ENQUEUED' THEN 0 ELSE 1 END,"
        " CASE WHEN s.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN now() END,"
        " CASE WHEN s.status = 'RUNNING' THEN now() END,"
        " CASE WHEN s.status = 'RUNNING' THEN 'w1' END,"
        " CASE WHEN s.status = 'WAITING' THEN 'paused' END"
        " FROM generate_series(1, $1) g CROSS JOIN LATERAL (SELECT CASE g % 500"
        " WHEN 1 THEN 'ENQUEUED' WHEN 2 THEN 'RUNNING' WHEN 3 THEN 'WAITING'"
        " WHEN 4 THEN 'FAILED' WHEN 5 THEN 'CANCELLED' ELSE 'SUCCEEDED' END AS status) s",
        BACKLOG * 10,
    )
    await db.execute("ANALYZE tasks")
    statement = await db.prepare("EXPLAIN (FORMAT JSON) " + sql.queries()["stats_counts_others"])
    (plan,) = json.loads(await statement.fetchval(["SUCCEEDED"]))
    reads = scans(plan["Plan"])
    assert reads and "Seq Scan" not in reads, reads


def walk(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a JSON plan tree."""
    yield plan
    for child in plan.get("Plans", []):
        yield from walk(child)


def nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Each node of a JSON plan tree that reads the tasks table: its type and index."""
    found = []
    if plan.get("Relation Name") == "tasks" and plan["Node Type"] != "ModifyTable":
        found.append((plan["Node Type"], plan.get("Index Name")))
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found


async def test_the_sweepers_look_for_missed_releases_reads_only_waiting_tasks(
    db: asyncpg.Connection,
) -> None:
    # Thousands of tasks, none WAITING: the probe is an index-only scan of an index
    # of WAITING rows; then thousands WAITING behind two keys: the walk reads one
    # probe of tasks_waiting per key, and the tasks released for each key (none
    # here) through tasks_released, never the other tasks.
    await db.execute(
        "INSERT INTO task_type (name, queue, concurrency_limit, concurrency_key,"
        " concurrency_source) VALUES ('demo.noop', 'default', 2, 'k', 'api')"
    )
    await db.execute(
        "INSERT INTO concurrency_slots (type, key, running, lim)"
        " VALUES ('demo.noop', 'k0', 0, 2), ('demo.noop', 'k1', 2, 2)"
    )
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
        " attempts, finished_at)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60,"
        " CASE WHEN g % 2 = 0 THEN 'SUCCEEDED' ELSE 'ENQUEUED' END, 0,"
        " CASE WHEN g % 2 = 0 THEN now() END FROM generate_series(1, $1) g",
        BACKLOG * 10,
    )
    await db.execute("VACUUM ANALYZE tasks")
    statement = await db.prepare("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.queries()["waiting_any"])
    (plan,) = json.loads(await statement.fetchval())
    reads = nodes(plan["Plan"])
    assert len(reads) == 1 and reads[0][0] == "Index Only Scan", reads
    assert reads[0][1] in {"tasks_waiting", "tasks_waiting_created"}, reads
    assert await db.fetchval(sql.queries()["waiting_any"]) is False
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
        " wait_reason, concurrency_key, published_at)"
        " SELECT gen_random_uuid(), 'demo.noop', 'default', '{}', 3, 60, 'WAITING',"
        " 'concurrency', 'k' || (g % 2), now() FROM generate_series(1, $1) g",
        BACKLOG,
    )
    await db.execute("ANALYZE tasks")
    for mode in ("force_custom_plan", "force_generic_plan"):
        async with db.transaction():
            await db.execute(f"SET LOCAL plan_cache_mode = {mode}")
            statement = await db.prepare(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.queries()["waiting_keys"]
            )
            (plan,) = json.loads(await statement.fetchval("", "", 1000))
        assert {index for _, index in nodes(plan["Plan"])} == {
            "tasks_waiting",
            "tasks_released",
        }, mode
        # A row or two per probe: the keys, never the tasks behind them.
        read = sum(n["Actual Rows"] * n["Actual Loops"] for n in walk(plan["Plan"])
                   if n.get("Relation Name") == "tasks")  # fmt: skip
        assert read <= 3, (mode, read)
    rows = await db.fetch(sql.queries()["waiting_keys"], "", "", 1000)
    assert [(r["type"], r["key"], r["room"]) for r in rows] == [
        ("demo.noop", "k0", True),
        ("demo.noop", "k1", False),
    ]
