"""Workflow definitions checked into a plan: the body of ``POST /workflows`` (which
``Client.enqueue_workflow`` builds from its chains and groups too).

A workflow is a list of nodes, each an enqueue request (type, payload and the
options of ``POST /enqueue`` but the idempotency key and unique, which belong to
the workflow or to lone tasks) with a ``name`` and the names of the nodes it
``depends_on``, in the order its handler reads their results
(``ctx.parent_results``). A node runs once every node it depends on has succeeded.

Every error names the node: its index (``nodes[3]``) in the field, its name in the
message. A graph with a cycle, a dependency on no node, more nodes or edges than the
settings allow, or a node that is not a valid enqueue is refused whole; the task
types are checked by the caller (it knows the registry). Pure: nothing here reads
the database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskq._utils import field_errors, preview, task_id
from taskq.enqueue.validation import enqueue_task, fingerprint, raise_all
from taskq.errors import FieldError, InvalidRequest
from taskq.settings import Settings
from taskq.store import NewTask, NewWorkflow

# A node's name: what depends_on names, shown by GET /workflows/{id}.
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:#@/-]{0,199}$")
ON_FAILURE = ("fail_fast", "continue")
# The fields of a node that an enqueue does not take.
NODE_FIELDS = ("name", "depends_on")
# Enqueue fields a node may not carry.
NOT_IN_NODES = ("idempotency_key", "unique")


class WorkflowBody(BaseModel):
    """The body of ``POST /workflows``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    nodes: list[Any] = Field(
        min_length=1, description="The nodes: enqueue requests with a name and depends_on."
    )
    name: str | None = Field(
        None, min_length=1, max_length=200, description="A name to find the workflow by."
    )
    on_failure: Literal["fail_fast", "continue"] = Field(
        "fail_fast",
        description="fail_fast: a failed node cancels every node not started; continue: only"
        " the nodes that depend on it.",
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, description="Same key and request: same workflow."
    )


def plan(data: Any, settings: Settings, *, traceparent: str | None = None) -> NewWorkflow:
    """Check a workflow definition (a parsed JSON body) into a plan.

    Raises:
        InvalidRequest: naming every node at fault (a cycle, a dependency on no node,
            too many nodes or edges, an invalid enqueue), and nothing else is checked
            past a malformed top level.
    """
    if not isinstance(data, dict):
        raise InvalidRequest([FieldError("body", "must be a JSON object")])
    try:
        body = WorkflowBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc, "")) from None
    for field, value in (("name", body.name), ("idempotency_key", body.idempotency_key)):
        if value is not None and "\x00" in value:
            raise InvalidRequest([FieldError(field, "may not contain NUL characters")])
    if len(body.nodes) > settings.max_workflow_nodes:
        raise InvalidRequest(
            [
                FieldError(
                    "nodes",
                    f"{len(body.nodes)} nodes, over the {settings.max_workflow_nodes} a workflow"
                    " may have (TASKQ_MAX_WORKFLOW_NODES)",
                )
            ]
        )
    errors: list[InvalidRequest] = []
    tasks: list[NewTask | None] = []
    names: list[str] = []
    wanted: list[list[str]] = []
    for index, item in enumerate(body.nodes):
        task, name, depends_on = _node(index, item, settings, traceparent, errors)
        tasks.append(task)
        names.append(name)
        wanted.append(depends_on)
    raise_all(errors)
    places = _places(names)
    parents = _parents(names, wanted, places, settings)
    _acyclic(names, parents)
    assert all(task is not None for task in tasks)
    return NewWorkflow(
        id=task_id(),
        name=body.name,
        on_failure=body.on_failure,
        idempotency_key=body.idempotency_key,
        fingerprint=fingerprint(data) if body.idempotency_key is not None else None,
        tasks=tuple(t for t in tasks if t is not None),
        names=tuple(names),
        parents=tuple(tuple(own) for own in parents),
    )


def _node(
    index: int,
    item: Any,
    settings: Settings,
    traceparent: str | None,
    errors: list[InvalidRequest],
) -> tuple[NewTask | None, str, list[str]]:
    """One node checked: its task (None if invalid; the errors collected), name and
    the names it depends on."""
    prefix = f"nodes[{index}]"
    if not isinstance(item, dict):
        errors.append(InvalidRequest([FieldError(prefix, "must be a JSON object")]))
        return None, "", []
    found: list[FieldError] = []
    name = item.get("name")
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        found.append(
            FieldError(
                prefix + ".name",
                "required: 1-200 letters, digits and _ . : # @ / -, starting with a letter"
                " or digit",
            )
        )
        name = ""
    depends_on = item.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
        found.append(FieldError(prefix + ".depends_on", "must be a list of node names"))
        depends_on = []
    elif len(set(depends_on)) != len(depends_on):
        found.append(FieldError(prefix + ".depends_on", f"node {preview(name)} names a node twice"))
    for field in NOT_IN_NODES:
        if field in item:
            found.append(
                FieldError(
                    f"{prefix}.{field}",
                    "not taken by a workflow node (the workflow has its own idempotency_key)",
                )
            )
    request = {k: v for k, v in item.items() if k not in NODE_FIELDS and k not in NOT_IN_NODES}
    task = None
    try:
        task, _ = enqueue_task(request, settings, prefix=prefix, traceparent=traceparent)
    except InvalidRequest as exc:
        found += exc.errors
    if found:
        errors.append(InvalidRequest(found))
        return None, name, depends_on
    return task, name, depends_on


def _places(names: Sequence[str]) -> dict[str, int]:
    places: dict[str, int] = {}
    errors = []
    for index, name in enumerate(names):
        if name in places:
            first = places[name]
            errors.append(
                FieldError(f"nodes[{index}].name", f"{preview(name)} names nodes[{first}] too")
            )
        else:
            places[name] = index
    if errors:
        raise InvalidRequest(errors)
    return places


def _parents(
    names: Sequence[str],
    wanted: Sequence[Sequence[str]],
    places: dict[str, int],
    settings: Settings,
) -> list[list[int]]:
    """Each node's parents by place; a dependency on no node, or one edge too many, is
    an error naming the node."""
    parents: list[list[int]] = []
    errors = []
    edges = 0
    for index, depends_on in enumerate(wanted):
        own = []
        for position, parent in enumerate(depends_on):
            place = places.get(parent)
            if place is None:
                errors.append(
                    FieldError(
                        f"nodes[{index}].depends_on[{position}]",
                        f"node {preview(names[index])} depends on {preview(parent)}, which is"
                        " no node of the workflow",
                    )
                )
            else:
                own.append(place)
        edges += len(own)
        if edges > settings.max_workflow_edges:
            raise InvalidRequest(
                [
                    FieldError(
                        f"nodes[{index}].depends_on",
                        f"at node {preview(names[index])} the workflow has more than"
                        f" {settings.max_workflow_edges} dependencies (TASKQ_MAX_WORKFLOW_EDGES)",
                    )
                ]
            )
        parents.append(own)
    if errors:
        raise InvalidRequest(errors)
    return parents


def _acyclic(names: Sequence[str], parents: Sequence[Sequence[int]]) -> None:
    """Refuse a graph with a cycle, naming a node on it and the cycle itself."""
    children: list[list[int]] = [[] for _ in names]
    waiting = [len(own) for own in parents]
    for child, own in enumerate(parents):
        for parent in own:
            children[parent].append(child)
    ready = [index for index, n in enumerate(waiting) if n == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if seen == len(names):
        return
    # Walk parents among the nodes left until one repeats: that is a cycle.
    start = next(index for index, n in enumerate(waiting) if n > 0)
    path: list[int] = []
    on_path: dict[int, int] = {}
    node = start
    while node not in on_path:
        on_path[node] = len(path)
        path.append(node)
        node = next(p for p in parents[node] if waiting[p] > 0)
    cycle = path[on_path[node] :]
    cycle.reverse()  # parent before child
    first = min(cycle)
    turn = cycle.index(first)
    cycle = cycle[turn:] + cycle[:turn]
    shown = " -> ".join(preview(names[i]) for i in [*cycle, first])
    raise InvalidRequest(
        [
            FieldError(
                f"nodes[{first}].depends_on",
                f"node {preview(names[first])} is in a cycle: {shown}",
            )
        ]
    )
