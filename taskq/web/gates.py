"""What holds tasks back: paused types and concurrency limits (admin API).

- ``POST /types/{name}/pause``: claims park the type's tasks WAITING (reason
  ``paused``) from now on; attempts already running go on; enqueue goes on.
- ``POST /types/{name}/resume``: the type is claimed again and every task the
  pause parked is released (ENQUEUED, published through the relay).
- ``GET /types/{name}/concurrency``: the busiest keys of a type's concurrency
  limit, with their tasks running and waiting.

A type's concurrency limit itself is part of its definition (``PUT /types/{name}``,
or a handler's ``concurrency=``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq._utils import preview
from taskq.enqueue.validation import TYPE_NAME
from taskq.errors import FieldError, InvalidRequest, Problem
from taskq.model import TaskTypeRecord
from taskq.web.http import app_client, endpoint, json_response
from taskq.web.limits import rate_limit_body

KEYS_LIMIT = 100
MAX_KEYS_LIMIT = 1000


def type_body(task_type: TaskTypeRecord) -> dict[str, Any]:
    """A task type as the API shows it."""
    schema, limit = task_type.payload_schema, task_type.concurrency
    return {
        "name": task_type.name,
        "queue": task_type.queue,
        "max_attempts": task_type.max_attempts,
        "timeout": task_type.timeout_seconds,
        "backoff": orjson.loads(task_type.backoff) if task_type.backoff else None,
        "payload_schema": orjson.loads(schema) if schema else None,
        "enabled": task_type.enabled,
        "unique": orjson.loads(task_type.unique_spec) if task_type.unique_spec else None,
        "rate_limit": rate_limit_body(task_type),
        "rate_limit_source": task_type.limiter_source,
        "paused": task_type.paused,
        "concurrency": None
        if limit is None
        else {"limit": limit.limit, "key": limit.key, "source": limit.source},
        "created_at": task_type.created_at,
        "updated_at": task_type.updated_at,
    }


def _name(request: Request) -> str:
    name: str = request.path_params["name"]
    if not TYPE_NAME.fullmatch(name):
        raise Problem(404, "Not found", f"no task type {preview(name)}")
    return name


@endpoint("type_pause")
async def pause_type(request: Request) -> Response:
    return await _pause(request, paused=True)


@endpoint("type_resume")
async def resume_type(request: Request) -> Response:
    return await _pause(request, paused=False)


async def _pause(request: Request, *, paused: bool) -> Response:
    name = _name(request)
    changed = await app_client(request).store.pause_type(name, paused)
    if changed is None:
        raise Problem(404, "Not found", f"no task type {name!r}")
    return json_response(type_body(changed))


@endpoint("type_concurrency")
async def concurrency_keys(request: Request) -> Response:
    name = _name(request)
    text = request.query_params.get("limit", str(KEYS_LIMIT))
    if not text.isdigit() or not 1 <= int(text) <= MAX_KEYS_LIMIT:
        raise InvalidRequest([FieldError("limit", f"an integer 1-{MAX_KEYS_LIMIT}")])
    store = app_client(request).store
    task_type = next((t for t in await store.task_types() if t.name == name), None)
    if task_type is None:
        raise Problem(404, "Not found", f"no task type {name!r}")
    keys = await store.concurrency_keys(name, int(text))
    limit = task_type.concurrency
    return json_response(
        {
            "type": name,
            "limit": None if limit is None else limit.limit,
            "key": None if limit is None else limit.key,
            "keys": [{"key": k.key, "running": k.running, "waiting": k.waiting} for k in keys],
        }
    )


def routes() -> list[Route]:
    return [
        Route("/types/{name}/pause", pause_type, methods=["POST"]),
        Route("/types/{name}/resume", resume_type, methods=["POST"]),
        Route("/types/{name}/concurrency", concurrency_keys, methods=["GET"]),
    ]
