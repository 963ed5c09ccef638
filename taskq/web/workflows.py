"""Workflows over HTTP: ``POST /workflows`` (a DAG as JSON), ``GET /workflows`` and
``GET /workflows/{id}``, ``POST /workflows/{id}/cancel``.

``POST /workflows`` is :meth:`taskq.Client.submit_workflow`: the graph is checked
whole (:mod:`taskq.enqueue.graphs`) before anything is written, and a 400 names the
node at fault. A failed node is retried with ``POST /tasks/{id}/retry``, which
resumes its workflow (the database does, migration 0019).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq._utils import preview
from taskq.enqueue.graphs import NODE_NAME, ON_FAILURE
from taskq.errors import FieldError, Problem
from taskq.settings import Settings
from taskq.web.admin import operator_reason
from taskq.web.cursors import Cursors
from taskq.web.http import actor, app_client, bad, endpoint, json_response, one, read_json
from taskq.web.openapi_schemas import ref
from taskq.workflows import WorkflowStatus

# As POST /enqueue/batch: a workflow's body may hold this many payloads' worth.
BODY_FACTOR = 16
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
STATUS_NAMES = tuple(s.value for s in WorkflowStatus)


def _workflow_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["id"])
    except ValueError:
        raise Problem(404, "Not found", "no such workflow") from None


@endpoint("workflow_enqueue")
async def enqueue_workflow(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    data = await read_json(request, settings.max_payload_bytes * BODY_FACTOR)
    result = await app_client(request).submit_workflow(data)
    return json_response(result.workflow, 201 if result.created else 200)


@endpoint("workflow")
async def get_workflow(request: Request) -> Response:
    found = await app_client(request).store.workflow(_workflow_id(request))
    if found is None:
        raise Problem(404, "Not found", "no such workflow")
    record, nodes = found
    edges = [{"from": parent, "to": n.name} for n in nodes for parent in n.depends_on]
    return json_response(
        {**record.to_json(), "nodes": [n.to_json() for n in nodes], "edges": edges}
    )


@endpoint("workflows")
async def list_workflows(request: Request) -> Response:
    status = one(request, "status")
    if status is not None and status not in STATUS_NAMES:
        raise bad("status", f"{preview(status)} is not one of {', '.join(STATUS_NAMES)}")
    name = one(request, "name")
    if name is not None and not 1 <= len(name) <= 200:
        raise bad("name", "1 to 200 characters")
    text = one(request, "limit")
    limit = DEFAULT_LIMIT
    if text is not None:
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise bad("limit", f"an integer from 1 to {MAX_LIMIT}")
        limit = int(text)
    cursors: Cursors = request.app.state.cursors
    cursor = None
    if (given := one(request, "cursor")) is not None:
        try:
            cursor = cursors.decode("workflows", given)
        except ValueError as exc:
            raise bad("cursor", str(exc)) from None
    found = await app_client(request).store.workflows(
        status=status, name=name, cursor=cursor, limit=limit + 1
    )
    page = found[:limit]
    next_cursor = None
    if len(found) > limit:
        next_cursor = cursors.encode("workflows", page[-1].created_at, page[-1].id)
    return json_response({"workflows": [w.to_json() for w in page], "next_cursor": next_cursor})


@endpoint("workflow_cancel")
async def cancel_workflow(request: Request) -> Response:
    workflow_id = _workflow_id(request)
    reason = await operator_reason(request)
    store = app_client(request).store
    done = await store.cancel_workflow(workflow_id, actor(request), reason)
    if done is None:
        raise Problem(404, "Not found", "no such workflow")
    found = await store.workflow(workflow_id)
    assert found is not None
    record, nodes = found
    if not done:
        raise Problem(
            409,
            "Conflict",
            f"cannot cancel a workflow that is {record.status}",
            errors=[FieldError("status", f"the workflow is {record.status}")],
        )
    return json_response({**record.to_json(), "nodes": [n.to_json() for n in nodes]})


def routes() -> list[Route]:
    return [
        Route("/workflows", enqueue_workflow, methods=["POST"]),
        Route("/workflows", list_workflows, methods=["GET"]),
        Route("/workflows/{id}", get_workflow, methods=["GET"]),
        Route("/workflows/{id}/cancel", cancel_workflow, methods=["POST"]),
    ]


def request_schemas(settings: Settings, enqueue: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schemas of ``POST /workflows``: its body, and one node (an enqueue
    request, ``enqueue``, without an idempotency key or unique, with a name and
    ``depends_on``)."""
    node = copy.deepcopy(enqueue)
    node["title"] = "WorkflowNode"
    props = node["properties"]
    props.pop("idempotency_key", None)
    props.pop("unique", None)
    props["name"] = {"type": "string", "pattern": NODE_NAME.pattern}
    props["depends_on"] = {
        "type": "array",
        "items": {"type": "string", "pattern": NODE_NAME.pattern},
        "uniqueItems": True,
        "description": "Nodes that must succeed first, in the order of ctx.parent_results.",
    }
    node["required"] = sorted({*node.get("required", []), "name"})
    body = {
        "title": "WorkflowRequest",
        "type": "object",
        "properties": {
            "nodes": {
                "type": "array",
                "items": ref("WorkflowNode"),
                "minItems": 1,
                "maxItems": settings.max_workflow_nodes,
            },
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "on_failure": {"type": "string", "enum": list(ON_FAILURE), "default": "fail_fast"},
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 255},
        },
        "required": ["nodes"],
        "additionalProperties": False,
    }
    return {"WorkflowRequest": body, "WorkflowNode": node}
