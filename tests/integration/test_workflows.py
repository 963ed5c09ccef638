"""Workflows with a real worker: chains, groups with a callback, failure policies,
cancels and retries, each node released in the transaction that ends its last parent."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from taskq import Client
from taskq.handlers import Context, Registry
from taskq.model import ClaimedTask, TaskStatus
from taskq.settings import Settings
from taskq.workflows import Workflow, chain, group
from tests.support.api_fixtures import JSON, running_api
from tests.support.worker_fixtures import Harness, harness, make_sweeper, running_worker, until

pytestmark = pytest.mark.integration

handlers = Registry()
# (node's task id, its parent results) of every attempt that ran, in the order they began.
seen: list[tuple[str, list[Any]]] = []
# Tasks that block until released (by their payload's "gate").
gates: dict[str, asyncio.Event] = {}


@handlers.task("flow.step", timeout=30)
async def step(payload: dict[str, Any], ctx: Context) -> Any:
    seen.append((payload["tag"], list(ctx.parent_results)))
    if "gate" in payload:
        await asyncio.wait_for(gates[payload["gate"]].wait(), 20)
    if payload.get("fail"):
        raise RuntimeError(f"{payload['tag']} fails")
    return {"tag": payload["tag"], "got": [r["tag"] for r in ctx.parent_results if r]}


@handlers.task("flow.fails", timeout=30, max_attempts=1)
async def fails(payload: dict[str, Any], ctx: Context) -> None:
    seen.append((payload["tag"], list(ctx.parent_results)))
    raise RuntimeError("fails for good")


def tags() -> list[str]:
    return [tag for tag, _ in seen]


async def workflow_done(h: Harness, workflow_id: uuid.UUID, timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await h.store.workflow(workflow_id)
        assert found is not None
        record, nodes = found
        if record.status != "RUNNING":
            return record, {n.name: n for n in nodes}
        if asyncio.get_running_loop().time() > deadline:
            states = {n.name: n.status for n in nodes}
            raise AssertionError(f"workflow still RUNNING: {states}")
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()
    gates.clear()


async def test_a_chain_runs_in_order_and_each_step_reads_its_parents_result(
    settings: Settings,
) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        flow = chain(*(step.s({"tag": f"s{n}"}) for n in range(4)))
        result = await client.enqueue_workflow(flow, name="chain-test")
        assert result.created
        ids = result.tasks
        assert list(ids) == ["flow.step", "flow.step#2", "flow.step#3", "flow.step#4"]
        record, nodes = await workflow_done(h, result.id)
        assert record.status == "SUCCEEDED" and record.succeeded == 4
        assert tags() == ["s0", "s1", "s2", "s3"]
        assert seen[0][1] == []
        assert seen[2][1] == [{"tag": "s1", "got": ["s0"]}]
        # Each began after its parent finished.
        for before, after in zip(list(nodes)[:-1], list(nodes)[1:], strict=True):
            assert nodes[before].finished_at <= nodes[after].started_at
        # A node waited in the one waiting state, never ENQUEUED before its parent ended.
        history = [e.status for e in await h.events(ids["flow.step#2"])]
        assert history == ["WAITING", "ENQUEUED", "RUNNING", "SUCCEEDED"]
        assert record.finished_at is not None


@pytest.mark.parametrize("inline_window", [0.0, 0.05])
async def test_the_worker_that_records_a_step_runs_the_next_one_with_no_publish(
    settings: Settings, inline_window: float
) -> None:
    # With an inline window the first step's success is recorded in its claim's
    # transaction (which hands the second over); without one, by the recorder.
    settings = settings.model_copy(update={"worker_inline_window": inline_window})
    async with (
        harness(settings) as h,
        running_worker(settings, handlers) as worker,
        Client.connect(settings) as client,
    ):
        flow = chain(*(step.s({"tag": f"s{n}"}, name=f"s{n}") for n in range(4)))
        result = await client.enqueue_workflow(flow)
        record, _ = await workflow_done(h, result.id)
        assert record.status == "SUCCEEDED"
        assert tags() == ["s0", "s1", "s2", "s3"]
        # Each later step was claimed in the transaction that recorded its parent's
        # success, by the same worker: never published, never delivered.
        handed = worker.metrics.registry.get_sample_value(
            "taskq_handoffs_total", {"queue": "default"}
        )
        assert handed == 3
        for n in range(1, 4):
            events = await h.events(result.tasks[f"s{n}"])
            assert [e.status for e in events] == ["WAITING", "ENQUEUED", "RUNNING", "SUCCEEDED"]
            assert events[2].worker_id == worker.worker_id


async def test_a_groups_callback_runs_once_after_all_with_results_in_order(
    settings: Settings,
) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        members = [step.s({"tag": f"m{n}"}, name=f"m{n}") for n in range(8)]
        flow = group(members).then(step.s({"tag": "callback"}, name="callback"))
        result = await client.enqueue_workflow(flow)
        record, nodes = await workflow_done(h, result.id)
        assert record.status == "SUCCEEDED"
        assert tags().count("callback") == 1 and tags()[-1] == "callback"
        [(_, results)] = [s for s in seen if s[0] == "callback"]
        assert [r["tag"] for r in results] == [f"m{n}" for n in range(8)]
        assert nodes["callback"].depends_on == tuple(f"m{n}" for n in range(8))
        assert nodes["callback"].started_at >= max(nodes[f"m{n}"].finished_at for n in range(8))


async def test_a_callback_whose_parents_results_are_too_large_fails_unrun(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_parent_results_bytes": 40})
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        members = [step.s({"tag": f"member-{n}"}, name=f"m{n}") for n in range(2)]
        flow = group(members).then(step.s({"tag": "callback"}, name="callback"))
        result = await client.enqueue_workflow(flow)
        record, _ = await workflow_done(h, result.id)
        assert record.status == "FAILED"
        callback = await h.task(result.tasks["callback"])
        # Two results of 30 bytes each: 60 in all, over the 40 allowed.
        assert callback.status == "FAILED" and callback.attempts == 1
        assert callback.last_error == (
            "ParentResultsTooLarge: its parents' results are 60 bytes of JSON, more than"
            " TASKQ_MAX_PARENT_RESULTS_BYTES (40)"
        )
        assert "callback" not in tags()


async def test_fail_fast_cancels_what_has_not_started(settings: Settings) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        gates["slow"] = asyncio.Event()
        flow = Workflow()
        slow = flow.add(step.s({"tag": "slow", "gate": "slow"}, name="slow"))
        flow.add(step.s({"tag": "after-slow"}, name="after-slow"), after=[slow])
        bad = flow.add(fails.s({"tag": "bad"}, name="bad"))
        flow.add(step.s({"tag": "after-bad"}, name="after-bad"), after=[bad])
        result = await client.enqueue_workflow(flow)
        bad_id = result.tasks["bad"]
        await h.wait_for(bad_id, "FAILED")
        after_slow = await h.wait_for(result.tasks["after-slow"], "CANCELLED")
        assert after_slow.started_at is None
        gates["slow"].set()  # the running node goes on and ends
        record, nodes = await workflow_done(h, result.id)
        assert record.status == "FAILED"
        assert nodes["slow"].status == "SUCCEEDED"
        assert {nodes[n].status for n in ("after-slow", "after-bad")} == {"CANCELLED"}
        assert nodes["after-bad"].skipped and nodes["after-slow"].skipped
        assert "after-slow" not in tags() and "after-bad" not in tags()
        assert (record.succeeded, record.failed, record.cancelled) == (1, 1, 2)


async def test_continue_runs_the_independent_branches(settings: Settings) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        flow = Workflow(on_failure="continue")
        bad = flow.add(fails.s({"tag": "bad"}, name="bad"))
        flow.add(step.s({"tag": "after-bad"}, name="after-bad"), after=[bad])
        ok = flow.add(step.s({"tag": "ok"}, name="ok"))
        flow.add(step.s({"tag": "after-ok"}, name="after-ok"), after=[ok])
        result = await client.enqueue_workflow(flow)
        record, nodes = await workflow_done(h, result.id)
        assert record.status == "FAILED"
        assert nodes["after-ok"].status == "SUCCEEDED"
        assert nodes["after-bad"].status == "CANCELLED" and nodes["after-bad"].started_at is None
        assert "after-bad" not in tags()


async def test_retrying_a_failed_node_resumes_the_workflow(settings: Settings) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        running_api(settings, relay=False) as api,
        Client.connect(settings) as client,
    ):
        flow = Workflow()
        first = flow.add(step.s({"tag": "first"}, name="first"))
        flaky = flow.add(
            step.s({"tag": "flaky", "fail": True}, name="flaky", max_attempts=1), after=[first]
        )
        flow.add(step.s({"tag": "last"}, name="last"), after=[flaky])
        flow.add(step.s({"tag": "other"}, name="other"))
        result = await client.enqueue_workflow(flow)
        await h.wait_for(result.tasks["flaky"], "FAILED")
        await h.wait_for(result.tasks["last"], "CANCELLED")
        record, _ = await workflow_done(h, result.id)
        assert record.status == "FAILED"
        # The operator fixes the cause and retries the failed node: the workflow resumes.
        async with h.store.pool.acquire() as connection:
            await connection.execute(
                "UPDATE taskq.tasks SET payload = payload - 'fail' WHERE id = $1",
                result.tasks["flaky"],
            )
        response = await api.post(f"/tasks/{result.tasks['flaky']}/retry", headers=JSON, json={})
        assert response.status_code == 200, response.text
        record, nodes = await workflow_done(h, result.id)
        assert record.status == "SUCCEEDED", {n: v.status for n, v in nodes.items()}
        assert tags().count("last") == 1 and tags().count("first") == 1
        [(_, results)] = [s for s in seen if s[0] == "last"]
        assert results == [{"tag": "flaky", "got": ["first"]}]
        # The independent node ran once: before the failure, or skipped and resumed.
        assert tags().count("other") == 1


async def test_cancel_cascades_to_running_nodes(settings: Settings) -> None:
    async with (
        harness(settings) as h,
        running_worker(settings, handlers, cancel_grace=0.5),
        running_api(settings, relay=False) as api,
        Client.connect(settings) as client,
    ):
        gates["held"] = asyncio.Event()
        flow = chain(
            step.s({"tag": "held", "gate": "held"}, name="held"),
            step.s({"tag": "next"}, name="next"),
        )
        result = await client.enqueue_workflow(flow)
        await h.wait_for(result.tasks["held"], "RUNNING")
        response = await api.post(f"/workflows/{result.id}/cancel", headers=JSON, json={})
        assert response.status_code == 200, response.text
        assert (await h.task(result.tasks["next"])).status == "CANCELLED"
        record, nodes = await workflow_done(h, result.id)
        assert record.status == "CANCELLED"
        assert nodes["held"].status == "CANCELLED"
        assert "next" not in tags()
        again = await api.post(f"/workflows/{result.id}/cancel", headers=JSON, json={})
        assert again.status_code == 409


async def test_a_node_the_settle_skipped_is_released_or_cancelled_by_the_sweeper(
    settings: Settings,
) -> None:
    async with harness(settings) as h, Client.connect(settings) as client:
        for name in ("flow.step", "flow.fails"):
            await h.put_type(name)
        flow = Workflow(on_failure="continue")
        ok = flow.add(step.s({"tag": "ok"}, name="ok"))
        flow.add(step.s({"tag": "after-ok"}, name="after-ok"), after=[ok])
        bad = flow.add(step.s({"tag": "bad"}, name="bad"))
        flow.add(step.s({"tag": "after-bad"}, name="after-bad"), after=[bad])
        result = await client.enqueue_workflow(flow)
        ids = result.tasks
        children = [ids["after-ok"], ids["after-bad"]]
        claims = {c.id: c for c in await h.store.claim([ids["ok"], ids["bad"]], "w", 30.0)}
        sweeper, link = await make_sweeper(h)
        try:
            # Another transaction holds both children while their parents end: the
            # settle skips them (a release after five tries), and notes them.
            async with h.store.pool.acquire() as holder, holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM taskq.tasks WHERE id = ANY($1) FOR UPDATE", children
                )
                await h.store.complete([(ids["ok"], claims[ids["ok"]].claim_token, "null")])
                await h.store.fail([(ids["bad"], claims[ids["bad"]].claim_token, "boom")])
                for child in children:
                    row = await h.task(child)
                    assert (row.status, row.wait_reason) == ("WAITING", "parents")
                noted = await h.store.pool.fetch("SELECT task_id FROM taskq.workflow_missed")
                assert sorted(r["task_id"] for r in noted) == sorted(children)
                # Still held: still noted, nothing done.
                assert await sweeper.repair_waiting(force=True) == 0
                assert len(await h.store.pool.fetch("SELECT FROM taskq.workflow_missed")) == 2
            assert await sweeper.repair_waiting(force=True) == 2
            assert await sweeper.repair_waiting(force=True) == 0
        finally:
            await sweeper.stop()
            await link.stop()
        released = await h.task(ids["after-ok"])
        assert (released.status, released.wait_reason) == ("ENQUEUED", None)
        assert [o.id for o in await h.store.owed_among(children)] == [ids["after-ok"]]
        found = await h.store.workflow(result.id)
        assert found is not None
        record, nodes = found
        by_name = {n.name: n for n in nodes}
        assert by_name["after-bad"].status == "CANCELLED" and by_name["after-bad"].skipped
        assert (record.status, record.succeeded, record.failed, record.cancelled) == (
            "RUNNING", 1, 1, 1,
        )  # fmt: skip
        assert await h.store.pool.fetch("SELECT FROM taskq.workflow_missed") == []
        assert sweeper.metrics is not None
        for reason in ("parents", "workflow_cancel"):
            sample = sweeper.metrics.registry.get_sample_value(
                "taskq_waiting_repaired_total", {"reason": reason}
            )
            assert sample == 1


async def test_two_operator_retries_of_one_workflow_at_once_do_not_deadlock(
    settings: Settings,
) -> None:
    # A failed node (its child skipped) and that child are retried at the same time.
    # The failed node's retry resumes the workflow, which moves the skipped child;
    # the child's own retry holds the child's row while it waits for the workflow.
    async with harness(settings) as h, Client.connect(settings) as client:
        await h.put_type("flow.step")
        flow = Workflow(on_failure="continue")
        bad = flow.add(step.s({"tag": "bad"}, name="bad"))
        flow.add(step.s({"tag": "child"}, name="child"), after=[bad])
        flow.add(step.s({"tag": "other"}, name="other"))
        result = await client.enqueue_workflow(flow)
        bad_id, child_id = result.tasks["bad"], result.tasks["child"]
        [claim] = await h.store.claim([bad_id], "w", 30.0)
        assert isinstance(claim, ClaimedTask)
        await h.store.fail([(bad_id, claim.claim_token, "boom")])
        assert (await h.task(child_id)).status == "CANCELLED"
        retryable = [TaskStatus.FAILED, TaskStatus.CANCELLED]

        async def waiting_for_locks() -> int:
            return int(
                await h.store.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )

        async with h.store.pool.acquire() as holder, holder.transaction():
            # The workflow's row held, so that both retries queue behind it in order:
            # the failed node's first (it will get the row first), then the child's.
            await holder.execute("SELECT FROM taskq.workflows WHERE id = $1 FOR UPDATE", result.id)
            first = asyncio.create_task(
                h.store.requeue([bad_id], retryable, action="retry", actor="t", reason=None)
            )
            await until(lambda: _at_least(waiting_for_locks, 1), "the first retry waits")
            second = asyncio.create_task(
                h.store.requeue([child_id], retryable, action="retry", actor="t", reason=None)
            )
            await until(lambda: _at_least(waiting_for_locks, 2), "the second retry waits")
        retried = await asyncio.gather(first, second)
        assert [[o.id for o in owed] for owed in retried] == [[bad_id], [child_id]]
        bad_row, child_row = await h.task(bad_id), await h.task(child_id)
        assert bad_row.status == "ENQUEUED"
        # The child waits for its parent again, whichever retry moved it.
        assert (child_row.status, child_row.wait_reason) == ("WAITING", "parents")
        found = await h.store.workflow(result.id)
        assert found is not None and found[0].status == "RUNNING"


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def count_rows(h: Harness) -> tuple[int, int, int, int]:
    async with h.store.pool.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM taskq.workflows), (SELECT count(*) FROM taskq.tasks),"
            " (SELECT count(*) FROM taskq.workflow_nodes),"
            " (SELECT count(*) FROM taskq.workflow_edges)"
        )
    assert row is not None
    return (row[0], row[1], row[2], row[3])


def node(name: str, *depends_on: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "flow.api",
        "payload": {},
        "depends_on": list(depends_on),
        **fields,
    }


BAD_GRAPHS = [
    # (body, field named, words in the message)
    ({"nodes": [node("a", "b"), node("b", "a")]}, "nodes[0].depends_on", "cycle"),
    ({"nodes": [node("a", "a")]}, "nodes[0].depends_on", "cycle"),
    ({"nodes": [node("a"), node("b", "a", "nope")]}, "nodes[1].depends_on[1]", "'nope'"),
    ({"nodes": [node("a"), node("b", type="no.such.type")]}, "nodes[1].type", "'b'"),
    ({"nodes": [node("a"), node("a")]}, "nodes[1].name", "'a'"),
    ({"nodes": [node("a", idempotency_key="k")]}, "nodes[0].idempotency_key", "workflow"),
    ({"nodes": [node("a", queue="nope")]}, "nodes[0].queue", "queue"),
    ({"nodes": [{"type": "flow.api", "payload": {}}]}, "nodes[0].name", "required"),
    ({"nodes": []}, "nodes", "at least 1"),
    ({"nodes": [node("a")], "on_failure": "sometimes"}, "on_failure", ""),
    ({"nodes": [node(f"n{i}") for i in range(6)]}, "nodes", "TASKQ_MAX_WORKFLOW_NODES"),
    (
        {"nodes": [node("a"), node("b"), node("c", "a", "b"), node("d", "a", "b", "c")]},
        "nodes[3].depends_on",
        "TASKQ_MAX_WORKFLOW_EDGES",
    ),
]


async def test_a_bad_graph_is_a_400_naming_the_node_and_creates_nothing(
    settings: Settings,
) -> None:
    small = settings.model_copy(update={"max_workflow_nodes": 5, "max_workflow_edges": 4})
    async with harness(small) as h, running_api(small, relay=False) as api:
        await h.put_type("flow.api")
        before = await count_rows(h)
        for body, field, words in BAD_GRAPHS:
            response = await api.post("/workflows", json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert problem["field"] == field, (body, problem)
            assert words in problem["detail"], (body, problem)
        assert await count_rows(h) == before


async def test_workflows_are_read_listed_replayed_and_counted_over_http(
    settings: Settings,
) -> None:
    async with harness(settings) as h, running_api(settings, relay=False) as api:
        await h.put_type("flow.step")
        body = {
            "name": "over-http",
            "idempotency_key": "wf-1",
            "nodes": [
                {"name": "a", "type": "flow.step", "payload": {"tag": "a"}},
                {"name": "b", "type": "flow.step", "payload": {"tag": "b"}, "depends_on": ["a"]},
            ],
        }
        created = await api.post("/workflows", json=body)
        assert created.status_code == 201, created.text
        answer = created.json()
        assert [n["status"] for n in answer["nodes"]] == ["ENQUEUED", "WAITING"]
        workflow_id = uuid.UUID(answer["id"])
        # Before any worker runs: the second node waits for its parent, WAITING.
        listed = (await api.get("/tasks", params={"status": "WAITING"})).json()["tasks"]
        assert [(t["id"], t["wait_reason"]) for t in listed] == [
            (answer["nodes"][1]["task_id"], "parents")
        ]
        enqueued = (await api.get("/tasks", params={"status": "ENQUEUED"})).json()["tasks"]
        assert [t["id"] for t in enqueued] == [answer["nodes"][0]["task_id"]]
        # A node's task names its workflow; a task enqueued alone names none.
        detail = (await api.get(f"/tasks/{answer['nodes'][1]['task_id']}")).json()
        assert detail["workflow_id"] == answer["id"]
        async with running_worker(settings, handlers):
            record, _ = await workflow_done(h, workflow_id)
        assert record.status == "SUCCEEDED"
        replay = await api.post("/workflows", json=body)
        assert replay.status_code == 200 and replay.json()["id"] == answer["id"]
        conflict = await api.post("/workflows", json={**body, "name": "other"})
        assert conflict.status_code == 409
        got = (await api.get(f"/workflows/{workflow_id}")).json()
        assert got["status"] == "SUCCEEDED" and got["counts"]["succeeded"] == 2
        assert got["edges"] == [{"from": "a", "to": "b"}]
        assert [n["name"] for n in got["nodes"]] == ["a", "b"]
        assert all(n["started_at"] and n["finished_at"] for n in got["nodes"])
        page = (await api.get("/workflows", params={"name": "over-http"})).json()
        assert [w["id"] for w in page["workflows"]] == [answer["id"]]
        none = (await api.get("/workflows", params={"status": "FAILED"})).json()
        assert none["workflows"] == []
        for params in ({"status": "nope"}, {"limit": "0"}, {"cursor": "x"}):
            assert (await api.get("/workflows", params=params)).status_code == 400
        assert (await api.get(f"/workflows/{uuid.uuid4()}")).status_code == 404
        assert (await api.get("/workflows/not-a-uuid")).status_code == 404
        cancel = await api.post(f"/workflows/{uuid.uuid4()}/cancel", headers=JSON, json={})
        assert cancel.status_code == 404
        metrics = (await api.get("/metrics")).text
        assert 'taskq_workflows{status="SUCCEEDED"} 1.0' in metrics
        # Retention takes the nodes' rows with their tasks, then the workflow.
        assert await h.store.delete_finished(0, 1000) == 2
        assert await h.store.prune_workflows(0, 1000) == 1
        assert await count_rows(h) == (0, 0, 0, 0)
        alone = await api.post("/enqueue", json={"type": "flow.step", "payload": {"tag": "x"}})
        assert alone.status_code in (200, 201, 202), alone.text
        assert (await api.get(f"/tasks/{alone.json()['id']}")).json()["workflow_id"] is None
