"""Workflows without services: chains and groups built into DAGs, and the checks of a
DAG (cycles, dependencies on no node, limits) that refuse it whole, naming the node."""

from __future__ import annotations

from typing import Any

import pytest

from taskq.enqueue import graphs
from taskq.errors import InvalidRequest
from taskq.handlers import Context, Registry
from taskq.settings import Settings
from taskq.workflows import Signature, Workflow, chain, group, workflow_body
from tests.support.services import make_settings

handlers = Registry()
SETTINGS = make_settings()


@handlers.task("wf.a")
async def a(payload: dict[str, Any], ctx: Context) -> None: ...


@handlers.task("wf.b")
async def b(payload: dict[str, Any], ctx: Context) -> None: ...


def shape(body: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(n["name"], n["depends_on"]) for n in body["nodes"]]


def test_a_chain_links_each_step_to_the_one_before() -> None:
    body = workflow_body(chain(a.s({}), b.s({}), a.s({})))
    assert shape(body) == [("wf.a", []), ("wf.b", ["wf.a"]), ("wf.a#2", ["wf.b"])]
    assert body["on_failure"] == "fail_fast"


def test_a_group_in_a_chain_fans_out_and_its_callback_waits_for_all_in_order() -> None:
    flow = chain(a.s({}, name="fetch"), group(b.s({}, name="x"), b.s({}, name="y")), a.s({}))
    assert shape(workflow_body(flow)) == [
        ("fetch", []),
        ("x", ["fetch"]),
        ("y", ["fetch"]),
        ("wf.a", ["x", "y"]),
    ]


def test_nested_chains_in_a_group_and_the_pipe() -> None:
    flow = group(a.s({}, name="a1") | b.s({}, name="b1"), [a.s({}, name="a2")]).then(
        b.s({}, name="cb")
    )
    assert shape(workflow_body(flow, name="n", on_failure="continue")) == [
        ("a1", []),
        ("b1", ["a1"]),
        ("a2", []),
        ("cb", ["b1", "a2"]),
    ]


def test_a_workflow_with_explicit_dependencies() -> None:
    flow = Workflow(name="dag")
    x = flow.add(a.s({"n": 1}))
    y = flow.add(b.s({}, timeout=5), after=[x])
    z = flow.add(a.s({}, name="z"), after=[x, y])
    body = flow.body(idempotency_key="k")
    assert (x, y, z) == ("wf.a", "wf.b", "z")
    assert shape(body) == [("wf.a", []), ("wf.b", ["wf.a"]), ("z", ["wf.a", "wf.b"])]
    assert body["nodes"][1]["timeout"] == 5 and body["nodes"][0]["payload"] == {"n": 1}
    assert body["name"] == "dag" and body["idempotency_key"] == "k"


def test_building_refuses_empty_steps_repeated_names_and_non_steps() -> None:
    with pytest.raises(ValueError, match="at least one"):
        chain()
    with pytest.raises(ValueError, match="at least one"):
        group()
    with pytest.raises(ValueError, match="two nodes named 'x'"):
        workflow_body(chain(a.s({}, name="x"), b.s({}, name="x")))
    with pytest.raises(TypeError, match="not a step"):
        chain(a.s({}), "wf.b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group"):
        Workflow().add(group(a.s({}), b.s({})))
    assert Signature("wf.x", {"k": 1}).node() == {"type": "wf.x", "payload": {"k": 1}}


def node(name: str, *depends_on: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "wf.a", "payload": {}, "depends_on": list(depends_on), **fields}


def refused(body: Any, settings: Settings | None = None) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as caught:
        graphs.plan(body, settings or SETTINGS)
    return [(e.field, e.message) for e in caught.value.errors]


def test_a_plan_keeps_the_order_of_nodes_and_of_each_nodes_parents() -> None:
    plan = graphs.plan(
        {"nodes": [node("c", "b", "a"), node("a"), node("b", "a")], "name": "p"}, SETTINGS
    )
    assert plan.names == ("c", "a", "b")
    assert plan.parents == ((2, 1), (), (1,))
    assert [t.type for t in plan.tasks] == ["wf.a"] * 3
    assert plan.name == "p" and plan.on_failure == "fail_fast" and plan.fingerprint is None
    keyed = graphs.plan({"nodes": [node("a")], "idempotency_key": "k"}, SETTINGS)
    again = graphs.plan({"nodes": [node("a")], "idempotency_key": "k"}, SETTINGS)
    assert keyed.fingerprint == again.fingerprint is not None
    assert keyed.id != again.id


@pytest.mark.parametrize(
    ("nodes", "field", "words"),
    [
        (
            [node("a", "b"), node("b", "c"), node("c", "a")],
            "nodes[0].depends_on",
            "'a' -> 'c' -> 'b' -> 'a'",
        ),
        ([node("x"), node("a", "a")], "nodes[1].depends_on", "cycle: 'a' -> 'a'"),
        ([node("a", "ghost")], "nodes[0].depends_on[0]", "'ghost', which is no node"),
        ([node("a"), node("a")], "nodes[1].name", "names nodes[0] too"),
        ([node("a", "x", "x"), node("x")], "nodes[0].depends_on", "twice"),
        ([node("bad name!")], "nodes[0].name", "required"),
        ([node("a", depends_on="b")], "nodes[0].depends_on", "list of node names"),
        ([node("a", unique={"key": "k"})], "nodes[0].unique", "not taken"),
        ([node("a", payload=[])], "nodes[0].payload", ""),
        (["a"], "nodes[0]", "JSON object"),
    ],
)
def test_a_bad_graph_is_refused_naming_the_node(nodes: list[Any], field: str, words: str) -> None:
    errors = refused({"nodes": nodes})
    assert errors[0][0] == field, errors
    assert words in errors[0][1], errors


def test_the_top_level_and_the_limits() -> None:
    assert refused([]) == [("body", "must be a JSON object")]
    assert refused({"nodes": [node("a")], "extra": 1})[0][0] == "extra"
    assert refused({"nodes": [node("a")], "name": "a\x00"})[0][0] == "name"
    small = make_settings(max_workflow_nodes=3, max_workflow_edges=2)
    nodes = [node("a"), node("b"), node("c"), node("d")]
    [(field, message)] = refused({"nodes": nodes}, small)
    assert field == "nodes" and "TASKQ_MAX_WORKFLOW_NODES" in message
    assert graphs.plan({"nodes": [node("a"), node("b", "a", "c"), node("c")]}, small).parents
    [(field, message)] = refused({"nodes": [node("a"), node("b", "a"), node("c", "a", "b")]}, small)
    assert field == "nodes[2].depends_on" and "TASKQ_MAX_WORKFLOW_EDGES" in message


def test_every_bad_node_is_named_at_once() -> None:
    errors = refused({"nodes": [node("a", queue="nope"), node("b"), node("c", max_attempts=0)]})
    assert [field for field, _ in errors] == ["nodes[0].queue", "nodes[2].max_attempts"]
