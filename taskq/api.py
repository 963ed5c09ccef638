"""The HTTP API: Starlette on uvicorn, JSON in and out, every error as problem+json.

Errors become ``application/problem+json`` (RFC 9457) in one place, :func:`_endpoint`,
with the offending field named in ``field`` and every error listed in ``errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

import taskq
from taskq import broker, validation
from taskq.client import Client
from taskq.errors import IdempotencyConflict, RejectedByDatabase, StoreError
from taskq.metrics import ApiMetrics
from taskq.openapi import openapi_document
from taskq.relay import Relay
from taskq.settings import Settings
from taskq.validation import FieldError, InvalidRequest, TooLarge

PROBLEM = "application/problem+json"
BATCH_BODY_FACTOR = 16
HEALTH_TIMEOUT = 2.0
TOPOLOGY_CHECK_EVERY = 10.0

Handler = Callable[[Request], Awaitable[Response]]


class Problem(Exception):
    """An HTTP error answered as problem+json."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors or []
        self.headers = headers
        self.extra = extra or {}

    def response(self) -> Response:
        body: dict[str, Any] = {
            "type": "urn:taskq:problem:" + self.title.lower().replace(" ", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["field"] = self.errors[0].field
            body["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        body.update(self.extra)
        return Response(orjson.dumps(body), self.status, self.headers, media_type=PROBLEM)


def _default(value: Any) -> str:
    # asyncpg returns its own UUID class, which orjson does not know.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, default=_default), status, headers, media_type="application/json"
    )


def _invalid(exc: InvalidRequest) -> Problem:
    if isinstance(exc, TooLarge):
        return Problem(413, "Payload too large", str(exc), errors=exc.errors)
    return Problem(400, "Invalid request", str(exc), errors=exc.errors)


def _endpoint(route: str, *, auth: bool = True) -> Callable[[Handler], Handler]:
    """Authentication, the error-to-problem mapping and request counting for one route."""

    def wrap(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            state = request.app.state
            try:
                if auth and state.settings.api_keys:
                    _authenticate(request, state.settings.api_keys)
                response = await handler(request)
            except Problem as problem:
                response = problem.response()
            except InvalidRequest as exc:
                response = _invalid(exc).response()
            except IdempotencyConflict as exc:
                response = Problem(
                    409,
                    "Idempotency conflict",
                    str(exc),
                    errors=[FieldError(exc.field, "already used with another request")],
                    extra={"task_id": str(exc.task_id)},
                ).response()
            except RejectedByDatabase as exc:
                response = Problem(
                    400, "Invalid request", str(exc), errors=[FieldError("body", str(exc))]
                ).response()
            except StoreError as exc:
                response = Problem(503, "Database unavailable", str(exc)).response()
            state.metrics.http_requests.labels(route, str(response.status_code)).inc()
            return response

        return endpoint

    return wrap


def _authenticate(request: Request, keys: list[str]) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given, k.encode()) for k in keys)
    if not ok:
        raise Problem(
            401,
            "Unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
            errors=[FieldError("authorization", "missing or wrong bearer token")],
            headers={"WWW-Authenticate": 'Bearer realm="taskq"'},
        )


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON, refusing other media types and oversized bodies."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise Problem(
            415,
            "Unsupported media type",
            f"send application/json, not {media or 'no content type'}",
            errors=[FieldError("content-type", "must be application/json")],
        )
    too_large = Problem(
        413,
        "Payload too large",
        f"the body exceeds {limit} bytes",
        errors=[FieldError("body", f"larger than {limit} bytes")],
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(
            400, "Invalid request", f"malformed JSON: {exc}", errors=[FieldError("body", str(exc))]
        ) from None


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


@_endpoint("enqueue")
async def enqueue(request: Request) -> Response:
    data = await read_json(request, request.app.state.settings.max_payload_bytes)
    result = await _client(request).submit(data)
    if result.created:
        return json_response(result.task, 201)
    return json_response(result.task, 200, {"Idempotent-Replayed": "true"})


@_endpoint("enqueue_batch")
async def enqueue_batch(request: Request) -> Response:
    settings = request.app.state.settings
    data = await read_json(request, settings.max_payload_bytes * BATCH_BODY_FACTOR)
    items = validation.batch_items(data)  # raises, naming the field
    results = await _client(request).enqueue_many(items)
    tasks = [{**r.task, "replayed": not r.created} for r in results]
    return json_response({"tasks": tasks}, 201 if any(r.created for r in results) else 200)


def _task_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["id"])
    except ValueError:
        raise Problem(404, "Not found", "no such task") from None


@_endpoint("task")
async def get_task(request: Request) -> Response:
    row = await _client(request).store.task(_task_id(request))
    if row is None:
        raise Problem(404, "Not found", "no such task")
    task = dict(row)
    for name in ("payload", "result"):
        task[name] = orjson.loads(task[name]) if task[name] is not None else None
    task["timeout"] = task.pop("timeout_seconds")
    return json_response(task)


@_endpoint("task_events")
async def get_task_events(request: Request) -> Response:
    store = _client(request).store
    task_id = _task_id(request)
    events = await store.task_events(task_id)
    if not events and await store.task(task_id) is None:
        raise Problem(404, "Not found", "no such task")
    return json_response({"task_id": task_id, "events": [dict(e) for e in events]})


def _type_body(row: Any) -> dict[str, Any]:
    return {
        "name": row["name"],
        "queue": row["queue"],
        "max_attempts": row["max_attempts"],
        "timeout": row["timeout_seconds"],
        "backoff": orjson.loads(row["backoff"]) if row["backoff"] else None,
        "payload_schema": orjson.loads(row["payload_schema"]) if row["payload_schema"] else None,
        "enabled": row["enabled"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


@_endpoint("types")
async def list_types(request: Request) -> Response:
    rows = await _client(request).store.task_types()
    return json_response({"types": [_type_body(row) for row in rows]})


@_endpoint("type")
async def get_type(request: Request) -> Response:
    name = request.path_params["name"]
    for row in await _client(request).store.task_types():
        if row["name"] == name:
            return json_response(_type_body(row))
    raise Problem(404, "Not found", f"no task type {name!r}")


@_endpoint("type_put")
async def put_type(request: Request) -> Response:
    settings = request.app.state.settings
    data = await read_json(request, settings.max_payload_bytes)
    definition = validation.task_type(request.path_params["name"], data, settings)
    client = _client(request)
    row = await client.store.put_task_type(
        definition.name,
        queue=definition.queue,
        max_attempts=definition.max_attempts,
        timeout_seconds=definition.timeout,
        backoff_json=definition.backoff_json,
        payload_schema_json=definition.payload_schema_json,
        enabled=definition.enabled,
    )
    client.types.invalidate()
    return json_response(_type_body(row), 201 if row["created"] else 200)


@_endpoint("info", auth=False)
async def info(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    return json_response(
        {
            "service": "taskq",
            "version": taskq.__version__,
            "namespace": settings.namespace,
            "queues": settings.queues,
            "queue_type": settings.queue_type,
        }
    )


@_endpoint("healthz", auth=False)
async def healthz(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(state.client.store.ping(), HEALTH_TIMEOUT)
        checks["database"] = "ok"
    except (StoreError, TimeoutError) as exc:
        checks["database"] = f"down: {exc or 'no answer within 2s'}"
    link: broker.Link = state.link
    if link.available:
        checks["broker"] = "ok"
        checks["topology"] = await _topology_status(request)
    else:
        checks["broker"] = "down: tasks are accepted and published when it is back"
    if all(value == "ok" for value in checks.values()):
        status, code = "ok", 200
    elif checks["database"] == "ok" and not link.available:
        status, code = "degraded", 200
    else:
        status, code = "error", 503
    if code == 503:
        failing = [name for name, value in checks.items() if value != "ok"]
        detail = f"failing: {', '.join(failing)}"
        return Problem(503, "Unhealthy", detail, extra={"health": status, **checks}).response()
    return json_response({"status": status, **checks}, code)


async def _topology_status(request: Request) -> str:
    state = request.app.state
    if time.monotonic() - state.topology_checked_at < TOPOLOGY_CHECK_EVERY:
        return str(state.topology_status)
    try:
        absent = await asyncio.wait_for(
            broker.missing(state.link.connection(), state.settings.topology()), HEALTH_TIMEOUT
        )
        status = "ok" if not absent else f"missing: {', '.join(absent[:5])} (run taskq rmq-init)"
    except Exception as exc:
        status = f"unknown: {exc}"
    state.topology_status, state.topology_checked_at = status, time.monotonic()
    return status


@_endpoint("metrics", auth=False)
async def metrics(request: Request) -> Response:
    state = request.app.state
    with contextlib.suppress(StoreError, TimeoutError):
        count = await asyncio.wait_for(state.client.store.unpublished_count(), HEALTH_TIMEOUT)
        state.metrics.unpublished.set(count)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@_endpoint("openapi", auth=False)
async def openapi(request: Request) -> Response:
    return json_response(openapi_document(request.app.state.settings))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {404: "Not found", 405: "Method not allowed"}
    title = titles.get(exc.status_code, "HTTP error")
    return Problem(exc.status_code, title, str(exc.detail), headers=exc.headers).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return Problem(500, "Internal error", "the server failed; see its log").response()


class _Api(Starlette):
    """Starlette, except that ``POST /enqueue``, the hot route, skips its routing and middleware.

    The route's endpoint is the same function as in the route list, with the same
    authentication, error mapping and request counting (:func:`_endpoint`); only
    the generic layers around it are skipped, which cost about as much CPU as
    the enqueue itself. An unexpected error gets the same 500 problem as from
    Starlette's error middleware and is raised on for the server to log.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/enqueue"
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            scope["app"] = self
            await _serve(enqueue, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def _serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    started = False

    async def send_tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        response = await handler(Request(scope, receive))
        await response(scope, receive, send_tracked)
    except Exception as exc:
        if not started:
            error = await _server_error(Request(scope), exc)
            await error(scope, receive, send)
        raise


def create_app(settings: Settings, *, relay: bool = True) -> Starlette:
    """The API application. Its lifespan opens the pool, the broker link and the relay."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        state.metrics = ApiMetrics()
        state.client = await Client.connect(settings, metrics=state.metrics)
        assert state.client._link is not None
        state.link = state.client._link
        state.topology_checked_at, state.topology_status = -1e9, "unknown"
        relay_ = Relay(state.client.store, settings.database_url, state.client.publisher)
        if relay:
            relay_.start()
        try:
            yield
        finally:
            await relay_.close()
            await state.client.close()

    routes = [
        Route("/", info, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/enqueue", enqueue, methods=["POST"]),
        Route("/enqueue/batch", enqueue_batch, methods=["POST"]),
        Route("/tasks/{id}", get_task, methods=["GET"]),
        Route("/tasks/{id}/events", get_task_events, methods=["GET"]),
        Route("/types", list_types, methods=["GET"]),
        Route("/types/{name}", get_type, methods=["GET"]),
        Route("/types/{name}", put_type, methods=["PUT"]),
    ]
    app = _Api(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.settings = settings
    return app
