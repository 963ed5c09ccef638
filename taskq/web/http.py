"""HTTP plumbing shared by the API's modules: problem+json errors, JSON bodies, auth.

Errors become ``application/problem+json`` (RFC 9457) in one place, :func:`endpoint`,
with the offending field named in ``field`` and every error listed in ``errors``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskq._utils import preview

if TYPE_CHECKING:
    from taskq.client import Client
    from taskq.settings import Settings
from taskq.errors import (
    Busy,
    FieldError,
    IdempotencyConflict,
    InvalidRequest,
    Problem,
    RejectedByDatabase,
    StoreError,
    TooLarge,
)

log = logging.getLogger("taskq.http")
PROBLEM = "application/problem+json"
# Methods of the routes that change something: each needs Content-Type: application/json.
CHANGES_STATE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[Request], Awaitable[Response]]


def problem_response(problem: Problem) -> Response:
    """The ``application/problem+json`` answer of ``problem``."""
    return Response(
        orjson.dumps(problem.body()), problem.status, problem.headers, media_type=PROBLEM
    )


# What a request that met a bug gets (and the log the error).
SERVER_ERROR = Problem(500, "Internal error", "the server failed; see its log")


def json_default(value: Any) -> str:
    # asyncpg returns its own UUID class, which orjson does not know.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, default=json_default), status, headers, media_type="application/json"
    )


def _invalid(exc: InvalidRequest) -> Problem:
    if isinstance(exc, TooLarge):
        return Problem(413, "Payload too large", str(exc), errors=exc.errors)
    return Problem(400, "Invalid request", str(exc), errors=exc.errors)


def endpoint(route: str, *, auth: bool = True) -> Callable[[Handler], Handler]:
    """Authentication, JSON-only state changes, the error-to-problem mapping and request
    counting for one route."""

    def wrap(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            state = request.app.state
            try:
                request.state.actor = "api"
                if auth and state.settings.api_keys:
                    request.state.actor = _authenticate(request, state.settings.api_keys)
                if request.method in CHANGES_STATE:
                    require_json(request)
                response = await handler(request)
            except Exception as exc:
                problem = problem_for(exc, route)
                if problem is None:
                    raise
                response = problem_response(problem)
            state.metrics.http_request(route, response.status_code)
            return response

        return endpoint

    return wrap


def problem_for(exc: Exception, route: str) -> Problem | None:
    """The problem answered for an error of ``route``; None for one that is a bug (a 500)."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, InvalidRequest):
        return _invalid(exc)
    if isinstance(exc, IdempotencyConflict):
        return Problem(
            409,
            "Idempotency conflict",
            str(exc),
            errors=[FieldError(exc.field, "already used with another request")],
            extra={"task_id": str(exc.task_id)},
        )
    if isinstance(exc, RejectedByDatabase):
        return Problem(400, "Invalid request", str(exc), errors=[FieldError("body", str(exc))])
    if isinstance(exc, StoreError):
        # The driver's words stay in the log: they can name hosts and users.
        log.warning("route %s: %s", route, exc)
        return Problem(503, "Database unavailable", "the database did not answer; try again")
    if isinstance(exc, Busy):
        return Problem(
            503,
            "Busy",
            "every payload check is taken; try again",
            headers={"Retry-After": "1"},
        )
    return None


def key_label(key: str) -> str:
    """How the event history names the holder of an API key, without revealing it."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _authenticate(request: Request, keys: list[str]) -> str:
    """The label of the request's API key; 401 if it has none of ``keys``."""
    return authenticate(request.headers.get("authorization", ""), keys)


def authenticate(authorization: str, keys: list[str]) -> str:
    """The label of the API key in an Authorization header; 401 if it holds none of ``keys``."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    # Compare with every key, so the time taken does not say which one matched.
    matches = [hmac.compare_digest(given, k.encode()) for k in keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise Problem(
            401,
            "Unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
            errors=[FieldError("authorization", "missing or wrong bearer token")],
            headers={"WWW-Authenticate": 'Bearer realm="taskq"'},
        )
    return key_label(keys[matches.index(True)])


def require_json(request: Request) -> None:
    """415 unless the request says its body is JSON (it may still be empty).

    Browsers send a cross-site form or ``fetch()`` without a preflight only with
    a "simple" content type (form encodings, ``text/plain``); requiring JSON on
    every request that changes state means another site can never make one.
    """
    check_json(request.headers.get("content-type", ""))


def check_json(content_type: str) -> None:
    """415 unless a Content-Type header says JSON (see :func:`require_json`)."""
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        shown = preview(media) if media else "no content type"
        raise Problem(
            415,
            "Unsupported media type",
            f"send Content-Type: application/json, not {shown}",
            errors=[FieldError("content-type", "must be application/json")],
        )


def check_length(content_length: str, limit: int) -> None:
    """413 if a Content-Length header announces more than ``limit`` bytes."""
    if content_length.isdigit() and int(content_length) > limit:
        raise too_large(limit)


def too_large(limit: int) -> Problem:
    """The 413 of a body over ``limit`` bytes."""
    return Problem(
        413,
        "Payload too large",
        f"the body exceeds {limit} bytes",
        errors=[FieldError("body", f"larger than {limit} bytes")],
    )


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON, refusing other media types and oversized bodies."""
    require_json(request)
    check_length(request.headers.get("content-length", ""), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return parse_json(body)


def parse_json(body: bytes | bytearray) -> Any:
    """A request body parsed as JSON; 400 naming what is malformed."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(
            400, "Invalid request", f"malformed JSON: {exc}", errors=[FieldError("body", str(exc))]
        ) from None


def app_client(request: Request) -> Client:
    """The API process's client (its store, publisher and type cache)."""
    client: Client = request.app.state.client
    return client


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def actor(request: Request) -> str:
    """Who made the request, as the event history records it."""
    return str(getattr(request.state, "actor", "api"))


def task_id(request: Request) -> uuid.UUID:
    """The task id in the path; 404 if it cannot be one."""
    try:
        return uuid.UUID(request.path_params["id"])
    except ValueError:
        raise Problem(404, "Not found", "no such task") from None


def bad(field: str, message: str) -> InvalidRequest:
    """A 400 naming ``field`` of the request (a query parameter, a body field)."""
    return InvalidRequest([FieldError(field, message)])


def one(request: Request, name: str) -> str | None:
    """The query parameter ``name``, None if absent; a 400 if it is given twice."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise bad(name, "give it once")
    return values[0] if values else None
