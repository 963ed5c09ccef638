"""Workflows under faults (issue #18): a fan-out of 1,000 branches with a callback,
run by two worker processes that are SIGKILLed and restarted five times, then across
a restart of the broker (a private RabbitMQ node, :mod:`tests.support.private_services`).

The broker restart is placed where a callback is most at risk: one branch is held
(it waits for a file) until every other branch has succeeded; the node is stopped;
the held branch is let go and succeeds while the broker is down, so the statement
that records its success releases the callback with its publish owed and no broker
to publish to. The node starts again; the relay publishes the callback and it runs.
The callback goes to a queue of its own, run by a third worker that is never killed:
a branches' worker would claim the callback its last success releases itself, in
the same transaction (a handoff, nothing published), and the publish owed across
the outage is what this scenario is about.

The kills come as the branches progress (at 10 to 70 % of them done), so none hits
the callback: a kill during its handler would run it again
(delivery is at least once; it would still succeed once), and what is shown here is
that nothing in the release itself runs it twice.

What must hold: every branch SUCCEEDED exactly once (one SUCCEEDED event each), the
callback ran exactly once (one execution, one attempt, one SUCCEEDED event), it
started after every branch had finished and got the 1,000 results in their order,
and the workflow SUCCEEDED. The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from taskq.client import Client
from taskq.workflows import group
from tests.support import ROOT
from tests.support.api_fixtures import declare_topology
from tests.support.fault_load import consumers
from tests.support.faults import (
    FAST,
    KILL_AT,
    all_terminal,
    audit,
    eventually,
    kill_as_work_progresses,
    processes,
    statuses,
)
from tests.support.flow_handlers import BRANCH, CALLBACK, branch, callback
from tests.support.private_services import PrivateRabbit, private_rabbit
from tests.support.services import make_settings

__all__ = ["private_rabbit"]  # a fixture, used by name

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(300)]

BRANCHES = 1000
HELD = 500  # the branch held until the broker is down
# 16 branches at once per worker, 0.15 s each: ~10 s of branches, time for the kills.
CONCURRENCY = "16"
SECONDS = 0.15
CALLBACK_QUEUE = "high"


async def test_a_fan_out_under_kills_and_a_broker_restart_runs_its_callback_once(
    private_rabbit: PrivateRabbit,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    db: asyncpg.Connection,
) -> None:
    settings = make_settings(
        database_url=database_url, amqp_url=private_rabbit.url, namespace=namespace, max_delay="1h"
    )
    await declare_topology(settings)
    go = tmp_path / "go"
    env = {**FAST, "PYTHONPATH": str(ROOT)}
    module = "tests.support.flow_handlers"
    async with processes(settings, tmp_path) as procs:

        async def start_worker() -> asyncio.subprocess.Process:
            return await procs.start(
                "worker", module, "--concurrency", CONCURRENCY, "--queues", "default", **env
            )

        workers = [await start_worker(), await start_worker()]
        # The callback's own worker (never killed): the branches' workers would claim
        # the callback their last success releases themselves (a handoff, no publish),
        # and the release with its publish owed while the broker is down is the point.
        callback_worker = await procs.start("worker", module, "--queues", CALLBACK_QUEUE, **env)

        async def all_consuming() -> bool:
            return await consumers(settings) == 2 and await consumers(settings, CALLBACK_QUEUE) == 1

        await eventually(all_consuming, 60, "3 workers consuming")
        members = [
            branch.s({"i": i, "seconds": SECONDS}, name=f"branch-{i}") for i in range(BRANCHES)
        ]
        members[HELD] = branch.s({"i": HELD, "wait_for": str(go)}, name=f"branch-{HELD}")
        flow = group(members).then(callback.s({}, name="callback", queue=CALLBACK_QUEUE))
        client = await Client.connect(settings)
        try:
            enqueued = await client.enqueue_workflow(flow, name="fan-out under faults")
        finally:
            await client.close()
        began = time.monotonic()
        workflow_id = enqueued.id
        tasks = enqueued.tasks
        branch_ids = [tasks[f"branch-{i}"] for i in range(BRANCHES)]
        held, callback_id = tasks[f"branch-{HELD}"], tasks["callback"]
        ids = [*branch_ids, callback_id]

        # 1. SIGKILL a worker and start another each time a further share of the
        # branches is done (10 to 70 %); the callback, released only after the held
        # branch (below), is far out of their reach.
        async def done() -> int:
            return (await statuses(db, branch_ids)).get("SUCCEEDED", 0)

        kills = await kill_as_work_progresses(procs, workers, start_worker, done, BRANCHES)
        assert kills == len(KILL_AT), f"only {kills} kills: the branches stopped progressing"

        # 2. Every branch but the held one done; the held one running, its handler waiting.
        others = [i for i in branch_ids if i != held]

        async def others_done() -> bool:
            return (await statuses(db, others)).get("SUCCEEDED", 0) == len(others)

        await eventually(others_done, 90, "every branch but the held one SUCCEEDED", every=0.25)

        async def held_waiting() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM tasks t JOIN flow_executions e"
                    " ON e.task_id = t.id AND e.attempt = t.attempts"
                    " WHERE t.id = $1 AND t.status = 'RUNNING' AND e.finished_at IS NULL",
                    held,
                )
            )

        await eventually(held_waiting, 60, "the held branch running, its handler waiting")
        before_release = await db.fetchval("SELECT status FROM tasks WHERE id = $1", callback_id)
        assert before_release == "WAITING"

        # 3. The broker goes away; the held branch succeeds; the callback is released
        # in that statement, its publish owed (nothing can publish it now).
        outage = time.monotonic()
        await asyncio.to_thread(private_rabbit.stop)
        go.touch()

        async def held_succeeded() -> bool:
            return (await statuses(db, [held])).get("SUCCEEDED", 0) == 1

        await eventually(held_succeeded, 60, "the held branch SUCCEEDED with the broker down")
        released = await db.fetchrow(
            "SELECT status, published_at, attempts FROM tasks WHERE id = $1", callback_id
        )
        assert released is not None
        assert (released["status"], released["published_at"], released["attempts"]) == (
            "ENQUEUED",
            None,
            0,
        ), dict(released)
        await asyncio.to_thread(private_rabbit.start)
        outage_seconds = time.monotonic() - outage

        # 4. The relay publishes the callback; it runs; the workflow ends.
        await all_terminal(db, ids, timeout=120)

        async def workflow_ended() -> bool:
            status = await db.fetchval("SELECT status FROM workflows WHERE id = $1", workflow_id)
            return bool(status != "RUNNING")

        await eventually(workflow_ended, 30, "the workflow ended")
        took = time.monotonic() - began
        alive = [w.returncode is None for w in (*workers, callback_worker)]
        recovered = await db.fetchval(
            "SELECT count(DISTINCT task_id) FROM task_events"
            " WHERE error LIKE 'lease expired: worker %' AND task_id = ANY($1::uuid[])",
            branch_ids,
        )
        executions = await db.fetchval(
            "SELECT count(*) FROM flow_executions WHERE task_id = ANY($1::uuid[])", branch_ids
        )
        figures = await audit(
            db,
            ids,
            "workflows: 1,000-branch fan-out + callback",
            faults=kills + 1,
            extra={
                "worker kills": kills,
                "branch executions": executions,
                "branches taken back after a kill": recovered,
                "broker outage (s)": round(outage_seconds, 1),
                "enqueue to workflow end (s)": round(took, 1),
            },
        )
        for worker in (*workers, callback_worker):
            await procs.stop(worker)

    assert alive == [True, True, True], "a worker died instead of reconnecting"
    assert recovered > 0, "no kill hit a running branch: the scenario proved nothing"
    assert figures.statuses == {"SUCCEEDED": BRANCHES + 1}
    workflow = await db.fetchrow("SELECT * FROM workflows WHERE id = $1", workflow_id)
    assert workflow is not None
    assert (workflow["status"], workflow["succeeded"], workflow["nodes"]) == (
        "SUCCEEDED",
        BRANCHES + 1,
        BRANCHES + 1,
    )
    # Every node SUCCEEDED exactly once.
    successes = await db.fetch(
        "SELECT task_id, count(*) AS n FROM task_events"
        " WHERE status = 'SUCCEEDED' AND task_id = ANY($1::uuid[]) GROUP BY task_id",
        ids,
    )
    assert len(successes) == len(ids) and {row["n"] for row in successes} == {1}
    # Every branch's handler ran to its end at least once (killed attempts did not).
    unfinished = await db.fetchval(
        "SELECT count(*) FROM unnest($1::uuid[]) AS b(id) WHERE NOT EXISTS"
        " (SELECT FROM flow_executions e WHERE e.task_id = b.id AND e.finished_at IS NOT NULL)",
        branch_ids,
    )
    assert unfinished == 0
    # The callback: one execution, at its first attempt, after every branch had finished,
    # with the branches' results in the group's order.
    runs = await db.fetch(
        "SELECT attempt, kind, parents, started_at FROM flow_executions WHERE task_id = $1",
        callback_id,
    )
    assert len(runs) == 1, [dict(r) for r in runs]
    [run] = runs
    assert (run["kind"], run["attempt"]) == (CALLBACK, 1)
    assert run["parents"] == list(range(BRANCHES))
    row = await db.fetchrow(
        "SELECT attempts, started_at, finished_at FROM tasks WHERE id = $1", callback_id
    )
    assert row is not None and row["attempts"] == 1
    last_branch_end = await db.fetchval(
        "SELECT max(finished_at) FROM tasks WHERE id = ANY($1::uuid[])", branch_ids
    )
    last_handler_end = await db.fetchval(
        "SELECT max(finished_at) FROM flow_executions WHERE kind = $1", BRANCH
    )
    assert row["started_at"] >= last_branch_end
    assert run["started_at"] > last_branch_end and run["started_at"] > last_handler_end
    history = [
        r["status"]
        for r in await db.fetch(
            "SELECT status FROM task_events WHERE task_id = $1 ORDER BY id", callback_id
        )
    ]
    assert history == ["WAITING", "ENQUEUED", "RUNNING", "SUCCEEDED"], history
    lag = (run["started_at"] - last_branch_end).total_seconds()
    print(f"[fault] workflows: the callback started {lag * 1000:.0f} ms after the last success")
