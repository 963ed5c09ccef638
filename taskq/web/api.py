"""The HTTP API: Starlette on uvicorn, JSON in and out, every error as problem+json.

Errors become ``application/problem+json`` in one place, :func:`taskq.web.http.endpoint`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

import taskq
from taskq._utils import preview
from taskq.amqp import broker
from taskq.client import Client, EnqueueResult
from taskq.enqueue import validation
from taskq.errors import (
    FieldError,
    InvalidRequest,
    Overrun,
    Problem,
    StoreError,
    TaskNotFound,
    TooManyTaskTypes,
    TooManyWaiters,
    UnknownLimiter,
)
from taskq.fleet.relay import Relay
from taskq.metrics import ApiMetrics
from taskq.model import TaskRecord
from taskq.service import OnStop, Services, Startable
from taskq.settings import Settings
from taskq.tracing import TRACEPARENT
from taskq.web import admin, gates, limits, monitor, queues, schedules, stream, ui, workflows
from taskq.web.cursors import Cursors
from taskq.web.gates import type_body
from taskq.web.hosts import HostCheck
from taskq.web.hot_route import serve_enqueue
from taskq.web.http import SERVER_ERROR, endpoint, json_response, problem_response, read_json
from taskq.web.http import task_id as _task_id
from taskq.web.openapi import openapi_document

log = logging.getLogger("taskq.api")
BATCH_BODY_FACTOR = 16
HEALTH_TIMEOUT = 2.0
# /healthz needs no key: its checks run at most this often, however often it is asked.
HEALTH_MAX_AGE = 1.0
SCHEMA_CHECK_SECONDS = 2.0
TOPOLOGY_CHECK_EVERY = 10.0


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def _traceparent(request: Request) -> str | None:
    """The request's ``traceparent`` header; "" (refused) if it has two."""
    found = request.headers.getlist(TRACEPARENT)
    return None if not found else found[0] if len(found) == 1 else ""


@endpoint("enqueue")
async def enqueue(request: Request) -> Response:
    data = await read_json(request, request.app.state.settings.max_payload_bytes)
    result = await _client(request).submit(data, traceparent=_traceparent(request))
    if result.created:
        return json_response(result.task, 201)
    if result.duplicate:
        return json_response(result.task, 200, {UNIQUE_HEADER: _kept_or_replaced(result)})
    return json_response(result.task, 200, {"Idempotent-Replayed": "true"})


# Answers a duplicate of a unique task: "kept" (the holder as it was) or "replaced".
UNIQUE_HEADER = "Unique-Duplicate"


def _kept_or_replaced(result: EnqueueResult) -> str:
    return "replaced" if result.replaced else "kept"


@endpoint("enqueue_batch")
async def enqueue_batch(request: Request) -> Response:
    settings = request.app.state.settings
    data = await read_json(request, settings.max_payload_bytes * BATCH_BODY_FACTOR)
    items = validation.batch_items(data)  # raises, naming the field
    results = await _client(request).enqueue_many(items, traceparent=_traceparent(request))
    tasks = [{**r.task, "replayed": not r.created and not r.duplicate} for r in results]
    return json_response({"tasks": tasks}, 201 if any(r.created for r in results) else 200)


@endpoint("task")
async def get_task(request: Request) -> Response:
    client = _client(request)
    task_id = _task_id(request)
    wait = _wait_seconds(request)
    if wait:
        task = await _long_poll(request, client, task_id, wait)
    else:
        task = await client.store.task(task_id)
    if task is None:
        raise Problem(404, "Not found", "no such task")
    return json_response(admin.task_body(task))


def _wait_seconds(request: Request) -> float:
    """``?wait=``: seconds to wait for the task to end, 0 to ``TASKQ_MAX_WAIT``."""
    values = request.query_params.getlist("wait")
    if not values:
        return 0.0
    limit = request.app.state.settings.max_wait
    problem = f"a number of seconds from 0 to {limit:g} (TASKQ_MAX_WAIT)"
    if len(values) > 1:
        raise InvalidRequest([FieldError("wait", "give it once")])
    try:
        seconds = float(values[0]) if len(values[0]) <= 20 else math.nan
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= limit:  # NaN fails too
        raise InvalidRequest([FieldError("wait", problem)])
    return seconds


async def _long_poll(
    request: Request, client: Client, task_id: uuid.UUID, seconds: float
) -> TaskRecord | None:
    """The task once it ends, or as it is after ``seconds`` (or when the server stops)."""
    stopping: asyncio.Event = request.app.state.stopping
    waiting = asyncio.ensure_future(client.waiters.wait(task_id, seconds))
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((waiting, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not waiting.done():
            waiting.cancel()
    if not waiting.done() or waiting.cancelled():  # the server stops: answer what is
        return await client.store.task(task_id)
    try:
        return waiting.result()
    except TaskNotFound:
        return None
    except TooManyWaiters as exc:
        raise Problem(503, "Too many waiters", str(exc), headers={"Retry-After": "1"}) from None


@endpoint("task_events")
async def get_task_events(request: Request) -> Response:
    store = _client(request).store
    task_id = _task_id(request)
    events = await store.task_events(task_id)
    if not events and await store.task(task_id) is None:
        raise Problem(404, "Not found", "no such task")
    return json_response({"task_id": task_id, "events": [asdict(e) for e in events]})


@endpoint("types")
async def list_types(request: Request) -> Response:
    types = await _client(request).store.task_types()
    return json_response({"types": [type_body(task_type) for task_type in types]})


@endpoint("type")
async def get_type(request: Request) -> Response:
    name = request.path_params["name"]
    for task_type in await _client(request).store.task_types():
        if task_type.name == name:
            return json_response(type_body(task_type))
    raise Problem(404, "Not found", f"no task type {name!r}")


@endpoint("type_put")
async def put_type(request: Request) -> Response:
    settings = request.app.state.settings
    data = await read_json(request, settings.max_payload_bytes)
    client = _client(request)
    name = request.path_params["name"]
    try:
        # Checking a payload schema can be slow on purpose-built input (taskq.enqueue.schemas).
        definition = await client.offload.run(
            SCHEMA_CHECK_SECONDS, validation.task_type, name, data, settings
        )
    except Overrun:
        message = f"checking it took over {SCHEMA_CHECK_SECONDS:g}s"
        raise InvalidRequest([FieldError("payload_schema", message)]) from None
    try:
        task_type, created = await client.store.put_task_type(
            definition.name,
            queue=definition.queue,
            max_attempts=definition.max_attempts,
            timeout_seconds=definition.timeout,
            backoff_json=definition.backoff_json,
            payload_schema_json=definition.payload_schema_json,
            enabled=definition.enabled,
            unique_json=definition.unique_json,
            max_types=settings.max_task_types,
            concurrency=definition.concurrency,
            rate_limit=definition.rate_limit,
        )
    except TooManyTaskTypes as exc:
        raise Problem(
            409, "Conflict", str(exc), errors=[FieldError("name", "the registry is full")]
        ) from None
    except UnknownLimiter as exc:
        raise InvalidRequest([FieldError("rate_limit", str(exc))]) from None
    client.types.invalidate()
    return json_response(type_body(task_type), 201 if created else 200)


@endpoint("info", auth=False)
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


@endpoint("healthz", auth=False)
async def healthz(request: Request) -> Response:
    state = request.app.state
    async with state.health_lock:  # one check at a time; the others take its answer
        if time.monotonic() - state.health[0] >= HEALTH_MAX_AGE:
            state.health = (time.monotonic(), await _health(request))
    status, checks = state.health[1]
    if status == "error":
        failing = [name for name, value in checks.items() if value != "ok"]
        detail = f"failing: {', '.join(failing)}"
        return problem_response(
            Problem(503, "Unhealthy", detail, extra={"health": status, **checks})
        )
    return json_response({"status": status, **checks})


async def _health(request: Request) -> tuple[str, dict[str, str]]:
    """``(ok | degraded | error, {part: "ok" or what is wrong})``.

    What is wrong is said in taskq's words; the driver's (which can name hosts,
    users and versions to anyone, as /healthz needs no key) go to the log.
    """
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(state.client.store.ping(), HEALTH_TIMEOUT)
        checks["database"] = "ok"
    except TimeoutError:
        checks["database"] = f"down: no answer within {HEALTH_TIMEOUT:g}s"
    except StoreError as exc:
        log.warning("health: the database failed: %s", exc)
        checks["database"] = "down: the database refused or dropped the connection"
    link: broker.Link = state.link
    if link.available:
        checks["broker"] = "ok"
        checks["topology"] = await _topology_status(request)
    else:
        checks["broker"] = "down: tasks are accepted and published when it is back"
    if all(value == "ok" for value in checks.values()):
        return "ok", checks
    if checks["database"] == "ok" and not link.available:
        return "degraded", checks
    return "error", checks


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
        log.warning("health: the topology could not be read: %s", exc)
        status = "unknown: the broker did not answer the check"
    state.topology_status, state.topology_checked_at = status, time.monotonic()
    return status


@endpoint("metrics", auth=False)
async def metrics(request: Request) -> Response:
    state = request.app.state
    watch: monitor.Monitor = state.monitor
    # Both cached for a few seconds: scrapes (no key needed) cannot drive the broker or
    # the database harder than one read each per DEPTHS_MAX_AGE.
    count = await watch.unpublished()
    if count is not None:
        state.metrics.unpublished.set(count)
    pauses = await watch.pauses()
    state.metrics.observe_pauses(
        state.settings.queues, None if pauses is None else [p.queue for p in pauses]
    )
    with contextlib.suppress(StoreError):
        stats = (await watch.stats()).stats
        state.metrics.observe_gates(stats.paused_types, stats.waiting)
    flows = await watch.workflows()
    if flows is not None:
        state.metrics.observe_workflows(flows)
    depths = await watch.broker_depths()
    state.metrics.observe_queues(
        None
        if depths is None
        else [(name, watch.kinds[name], *counts) for name, counts in depths.items()]
    )
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@endpoint("openapi", auth=False)
async def openapi(request: Request) -> Response:
    return json_response(openapi_document(request.app.state.settings))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {404: "Not found", 405: "Method not allowed"}
    title = titles.get(exc.status_code, "HTTP error")
    return problem_response(Problem(exc.status_code, title, str(exc.detail), headers=exc.headers))


async def _server_error(request: Request, exc: Exception) -> Response:
    return problem_response(SERVER_ERROR)


class _Api(Starlette):
    """Starlette, with the Host check first (taskq.web.hosts), and with ``POST /enqueue``,
    the hot route, skipping Starlette's routing and middleware.

    The route is served by :func:`taskq.web.hot_route.serve_enqueue`, which does what the
    route's endpoint in the route list does (the same authentication, checks, error
    mapping and request counting), without Starlette's routing, middleware, request and
    response, which cost about as much CPU as the enqueue itself. An unexpected error
    gets the same 500 problem as from Starlette's error middleware and is raised on for
    the server to log.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _host_allowed(self.state.hosts, scope):
            await problem_response(_wrong_host(scope))(scope, receive, send)
        elif (
            scope["type"] == "http"
            and scope["path"] == "/enqueue"
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            scope["app"] = self
            await serve_enqueue(self.state, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _host_allowed(hosts: HostCheck, scope: Scope) -> bool:
    values = [value for name, value in scope["headers"] if name == b"host"]
    return len(values) <= 1 and hosts.allows(values[0].decode("latin-1") if values else None)


def _wrong_host(scope: Scope) -> Problem:
    values = [value for name, value in scope["headers"] if name == b"host"]
    shown = preview(values[0].decode("latin-1")) if len(values) == 1 else f"{len(values)} hosts"
    return Problem(
        400,
        "Invalid request",
        f"this API does not answer to the host {shown}: see TASKQ_ALLOWED_HOSTS",
        errors=[FieldError("host", "not one of TASKQ_ALLOWED_HOSTS")],
    )


def create_app(settings: Settings, *, relay: bool = True) -> Starlette:
    """The API application. Its lifespan opens the pool, the broker link and the relay."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        state.metrics = ApiMetrics()
        state.client = client = await Client.connect(settings, metrics=state.metrics)
        assert client.link is not None  # connect() gives it one
        state.link = client.link
        state.topology_checked_at, state.topology_status = -1e9, "unknown"
        state.monitor = monitor.Monitor(settings, client.store, client.link)
        state.hub = stream.Hub(state.monitor, state.stopping, settings.max_streams)

        async def end_streams() -> None:
            state.stopping.set()

        # Started in order (the client runs already), stopped in reverse: the open event
        # streams end first, then the hub, the monitor's channel, the relay, the client.
        parts: list[Startable] = [client]
        if relay:
            set_aside = state.metrics.set_aside
            parts.append(
                Relay(
                    client.store,
                    settings.session_database_url,
                    client.publisher,
                    set_aside=set_aside,
                )
            )
        parts += [
            OnStop(state.monitor.close, name="taskq-monitor"),
            state.hub,
            OnStop(end_streams, name="taskq-streams"),
        ]
        services = Services(parts, name="taskq-api")
        await services.start()
        try:
            yield
        finally:
            await services.stop()

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
        *admin.routes(),
        *queues.routes(),
        *schedules.routes(),
        *gates.routes(),
        *limits.routes(),
        *workflows.routes(),
        *monitor.routes(),
        Route("/stream", stream.stream, methods=["GET"]),
        Mount("/ui", ui.dashboard(), name="ui"),
    ]
    app = _Api(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.settings = settings
    app.state.cursors = Cursors(settings)
    app.state.hosts = HostCheck(settings)
    app.state.health = (-1e9, ("error", {}))
    app.state.health_lock = asyncio.Lock()
    # Set when the server begins to stop: open event streams end, so the
    # graceful shutdown does not wait for them (see taskq.cli).
    app.state.stopping = asyncio.Event()
    return app
