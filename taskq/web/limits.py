"""The rate limiters API: ``GET /limits``, and ``PUT``, ``GET`` and ``DELETE /limits/{name}``.

A limiter allows ``limit`` starts per ``per`` to the tasks of the types that name it
(``rate_limit`` of ``PUT /types/{name}``, or ``rate_limit="name"`` in the decorator),
with one bucket per value of payload field ``key`` when it is set; see
:mod:`taskq.ratelimits`. A type's own limit shows here too, named ``type:<type>``
(read-only: change it through its type). A limiter that types name cannot be
deleted (409).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq import ratelimits
from taskq._utils import preview
from taskq.errors import FieldError, InvalidRequest, LimiterInUse, Problem, TooManyLimiters
from taskq.model import LimiterRecord, TaskTypeRecord
from taskq.web.http import app_client, app_settings, endpoint, json_response, read_json


def limiter_body(limiter: LimiterRecord) -> dict[str, Any]:
    return {
        "name": limiter.name,
        "limit": limiter.rate,
        "per": limiter.per_seconds,
        "burst": limiter.burst,
        "key": limiter.key,
        "type": limiter.type_name,
        "types": limiter.types,
        "busy_until": limiter.busy_until,
        "created_at": limiter.created_at,
        "updated_at": limiter.updated_at,
    }


def rate_limit_body(task_type: TaskTypeRecord) -> object:
    """A type's ``rate_limit`` as the API shows it: its own limit, a limiter's name, or None."""
    if task_type.rate_limit is not None:
        return orjson.loads(task_type.rate_limit)
    return task_type.limiter


async def _found(request: Request, name: str) -> LimiterRecord:
    found = await app_client(request).store.limiters(name)
    if not found:
        raise Problem(404, "Not found", f"no rate limiter {preview(name)}")
    return found[0]


@endpoint("limits")
async def list_limits(request: Request) -> Response:
    limiters = await app_client(request).store.limiters()
    return json_response({"limits": [limiter_body(limiter) for limiter in limiters]})


@endpoint("limit")
async def get_limit(request: Request) -> Response:
    return json_response(limiter_body(await _found(request, request.path_params["name"])))


@endpoint("limit_put")
async def put_limit(request: Request) -> Response:
    name = request.path_params["name"]
    data = await read_json(request, app_settings(request).max_payload_bytes)
    errors = []
    if not ratelimits.LIMITER_NAME.match(name):
        errors.append(FieldError("name", "use 1-100 letters, digits, '.', '_' or '-'"))
    errors += ratelimits.problems(data, "")
    if errors:
        raise InvalidRequest(errors)
    limit = ratelimits.parse(data)
    try:
        created = await app_client(request).store.put_limiter(name, limit)
    except TooManyLimiters as exc:
        raise Problem(
            409, "Conflict", str(exc), errors=[FieldError("name", "too many limiters")]
        ) from None
    return json_response(limiter_body(await _found(request, name)), 201 if created else 200)


@endpoint("limit_delete")
async def delete_limit(request: Request) -> Response:
    name = request.path_params["name"]
    try:
        deleted = await app_client(request).store.delete_limiter(name)
    except LimiterInUse as exc:
        raise Problem(409, "Conflict", str(exc)) from None
    if not deleted:
        raise Problem(404, "Not found", f"no rate limiter {preview(name)}")
    return json_response({"deleted": name})


def routes() -> list[Route]:
    return [
        Route("/limits", list_limits, methods=["GET"]),
        Route("/limits/{name}", get_limit, methods=["GET"]),
        Route("/limits/{name}", put_limit, methods=["PUT"]),
        Route("/limits/{name}", delete_limit, methods=["DELETE"]),
    ]
