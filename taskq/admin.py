"""The admin API: list, cancel and retry tasks, the DLQ and its replay, queue purges, workers.

State rules (every change runs as one guarded statement, so concurrent
operators and workers cannot both win):

- cancel: ENQUEUED (scheduled or not) → CANCELLED at once; the envelope, wherever
  it waits, is dropped by the claim. RUNNING → a cancel request (202) that the
  worker learns from its heartbeat; the attempt then ends CANCELLED. Terminal → 409.
- retry: FAILED or CANCELLED → ENQUEUED with fresh attempts, published through
  the outbox (the relay pays it if the broker is down). Anything else → 409.
- DLQ replay: the same for FAILED rows matching a filter; a second run finds
  none left (they are ENQUEUED or done), so it replays nothing.
- queue purge: the queue's ENQUEUED rows are CANCELLED (in batches, locked in
  id order as claims lock them), then the broker queue is purged; tasks that
  became ENQUEUED meanwhile have their publishes owed again (see purge_queue).

Every operator action is recorded in the task's event history with ``action``,
``actor`` (the API key's label, or ``api``) and ``reason``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq._utils import preview
from taskq.client import Client
from taskq.cursors import Cursors
from taskq.errors import BrokerError, FieldError, InvalidRequest, Problem
from taskq.http import actor, endpoint, json_response, read_json, task_id
from taskq.settings import QUEUE_NAME, Settings
from taskq.store import Row
from taskq.validation import TYPE_NAME, parse_rfc3339

STATUSES = ("ENQUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# Listings carry payloads and results only when asked for (?include=payload,result),
# and then at most this many tasks a page: each can be a MiB.
INCLUDABLE = ("payload", "result")
MAX_LIMIT_INCLUDED = 50
MAX_REPLAY = 10_000
REPLAY_BATCH = 1000
PURGE_BATCH = 1000
MAX_REASON = 1000


def task_body(row: Row) -> dict[str, Any]:
    """A task as the API shows it (``GET /tasks/{id}`` and every listing)."""
    task = dict(row)
    for name in ("payload", "result"):
        task[name] = orjson.loads(task[name]) if task[name] is not None else None
    task["timeout"] = task.pop("timeout_seconds")
    return task


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest([FieldError(field, message)])


# ---------------------------------------------------------------- query parameters


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise _bad(name, "give it once")
    return values[0] if values else None


def _limit(request: Request, include: frozenset[str]) -> int:
    """The page size; with ``include``, pages hold at most MAX_LIMIT_INCLUDED tasks."""
    text = _one(request, "limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit() or len(text) > 4 or not 1 <= int(text) <= MAX_LIMIT:
        raise _bad("limit", f"an integer from 1 to {MAX_LIMIT}")
    return min(int(text), MAX_LIMIT_INCLUDED) if include else int(text)


def _include(request: Request) -> frozenset[str]:
    values = {s.strip() for v in request.query_params.getlist("include") for s in v.split(",")}
    for value in values:
        if value not in INCLUDABLE:
            raise _bad("include", f"{preview(value)} is not one of {', '.join(INCLUDABLE)}")
    return frozenset(values)


def _type(request: Request) -> str | None:
    text = _one(request, "type")
    if text is not None and not TYPE_NAME.fullmatch(text):
        raise _bad("type", "not a task type name")
    return text


def _queue(request: Request) -> str | None:
    text = _one(request, "queue")
    if text is not None and not QUEUE_NAME.fullmatch(text):
        raise _bad("queue", "not a queue name")
    return text


def _time(request: Request, name: str) -> datetime | None:
    text = _one(request, name)
    if text is None:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise _bad(name, str(exc)) from None


def _statuses(request: Request) -> list[str] | None:
    values = {s.strip() for v in request.query_params.getlist("status") for s in v.split(",")}
    if not values:
        return None
    for value in values:
        if value not in STATUSES:
            raise _bad("status", f"{preview(value)} is not one of {', '.join(STATUSES)}")
    return sorted(values)


def _scheduled(request: Request) -> bool | None:
    text = _one(request, "scheduled")
    if text is None:
        return None
    if text not in ("true", "false"):
        raise _bad("scheduled", "true or false")
    return text == "true"


def _cursor(request: Request, listing: str) -> tuple[datetime | None, uuid.UUID | None]:
    text = _one(request, "cursor")
    if text is None:
        return None, None
    try:
        return _cursors(request).decode(listing, text)
    except ValueError as exc:
        raise _bad("cursor", str(exc)) from None


def _cursors(request: Request) -> Cursors:
    cursors: Cursors = request.app.state.cursors
    return cursors


def _page(
    request: Request, listing: str, rows: list[Row], limit: int, include: frozenset[str]
) -> dict[str, Any]:
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows and more else None
    key = "created_at" if listing == "tasks" else "finished_at"
    cursor = None if last is None else _cursors(request).encode(listing, last[key], last["id"])
    tasks = [task_body(row) for row in rows]
    for task in tasks:
        for name in set(INCLUDABLE) - include:
            del task[name]
    return {"tasks": tasks, "next_cursor": cursor}


# ---------------------------------------------------------------- endpoints


@endpoint("tasks")
async def list_tasks(request: Request) -> Response:
    include = _include(request)
    limit = _limit(request, include)
    at, after_id = _cursor(request, "tasks")
    rows = await _client(request).store.fetch(
        "tasks_list",
        _statuses(request),
        _type(request),
        _queue(request),
        _time(request, "created_after"),
        _time(request, "created_before"),
        _scheduled(request),
        at,
        after_id,
        limit + 1,
        "payload" in include,
        "result" in include,
    )
    return json_response(_page(request, "tasks", rows, limit, include))


async def _reason(request: Request) -> str | None:
    """The optional ``{"reason": "..."}`` body of an operator action."""
    if not await _has_body(request):
        return None
    data = await read_json(request, 64 * 1024)
    if not isinstance(data, dict):
        raise _bad("body", 'a JSON object, e.g. {"reason": "..."}')
    unknown = sorted(set(data) - {"reason"})
    if unknown:
        raise _bad(unknown[0], "unknown field")
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise _bad("reason", f"a string of at most {MAX_REASON} characters")
    if reason is not None and "\x00" in reason:
        raise _bad("reason", "may not contain NUL")
    return reason


async def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in request.headers


def _conflict(task: Row, action: str) -> Problem:
    status = task["status"]
    return Problem(
        409,
        "Conflict",
        f"cannot {action} a task that is {status}",
        errors=[FieldError("status", f"the task is {status}")],
        extra={"task_status": status},
    )


async def _task_or_404(request: Request, row_id: uuid.UUID) -> Row:
    task = await _client(request).store.task(row_id)
    if task is None:
        raise Problem(404, "Not found", "no such task")
    return task


@endpoint("task_cancel")
async def cancel_task(request: Request) -> Response:
    row_id = task_id(request)
    reason = await _reason(request)
    store = _client(request).store
    done = await store.as_operator("cancel", actor(request), reason, "cancel", row_id)
    task = await _task_or_404(request, row_id)
    if not done:
        raise _conflict(task, "cancel")
    return json_response(task_body(task), 202 if done[0]["status"] == "RUNNING" else 200)


@endpoint("task_retry")
async def retry_task(request: Request) -> Response:
    row_id = task_id(request)
    reason = await _reason(request)
    rows = await _requeue(request, [row_id], ["FAILED", "CANCELLED"], "retry", reason)
    task = await _task_or_404(request, row_id)
    if not rows:
        raise _conflict(task, "retry")
    return json_response(task_body(task))


async def _requeue(
    request: Request, ids: list[uuid.UUID], statuses: list[str], action: str, reason: str | None
) -> list[Row]:
    """ENQUEUE ``ids`` that are in ``statuses`` again with fresh attempts, and publish them."""
    client = _client(request)
    rows = await client.store.as_operator(action, actor(request), reason, "requeue", ids, statuses)
    for row in rows:
        if not client.outbox.submit(row):
            break  # the outbox is full: the relay publishes the rest
    return rows


@endpoint("dlq")
async def list_dlq(request: Request) -> Response:
    include = _include(request)
    limit = _limit(request, include)
    at, after_id = _cursor(request, "dlq")
    state = request.app.state
    rows = await _client(request).store.fetch(
        "dlq_list",
        _type(request),
        _queue(request),
        at,
        after_id,
        limit + 1,
        "payload" in include,
        "result" in include,
    )
    body = _page(request, "dlq", rows, limit, include)
    dlq = _settings(request).topology().names.dlq
    depths = await state.monitor.broker_depths()
    body["broker_messages"] = depths[dlq][0] if depths and dlq in depths else None
    return json_response(body)


def _replay_filter(
    data: Any, settings: Settings
) -> tuple[str | None, str | None, list[uuid.UUID] | None]:
    if not isinstance(data, dict):
        raise _bad("body", 'a JSON object: {"type"?, "queue"?, "ids"?}')
    unknown = sorted(set(data) - {"type", "queue", "ids"})
    if unknown:
        raise _bad(unknown[0], "unknown field")
    errors = []
    task_type, queue, ids = data.get("type"), data.get("queue"), data.get("ids")
    if task_type is not None and not (
        isinstance(task_type, str) and TYPE_NAME.fullmatch(task_type)
    ):
        errors.append(FieldError("type", "not a task type name"))
    if queue is not None and queue not in settings.queues:
        errors.append(FieldError("queue", f"one of {', '.join(settings.queues)}"))
    parsed: list[uuid.UUID] | None = None
    if ids is not None:
        if not isinstance(ids, list) or len(ids) > MAX_REPLAY:
            errors.append(FieldError("ids", f"a list of at most {MAX_REPLAY} task ids"))
        else:
            parsed = []
            for n, item in enumerate(ids):
                try:
                    parsed.append(uuid.UUID(item) if isinstance(item, str) else uuid.UUID(""))
                except ValueError:
                    errors.append(FieldError(f"ids[{n}]", "not a UUID"))
    if errors:
        raise InvalidRequest(errors)
    return task_type, queue, parsed


@endpoint("dlq_replay")
async def replay_dlq(request: Request) -> Response:
    settings = _settings(request)
    data = await read_json(request, 1024 * 1024) if await _has_body(request) else {}
    task_type, queue, ids = _replay_filter(data, settings)
    store = _client(request).store
    replayed: list[str] = []
    # Bounded batches: each is one short transaction; a row replayed by a
    # concurrent call is FAILED no more and is not picked twice.
    while len(replayed) < MAX_REPLAY:
        size = min(REPLAY_BATCH, MAX_REPLAY - len(replayed))
        picked = await store.fetch("dlq_pick", task_type, queue, ids, size)
        if not picked:
            break
        rows = await _requeue(request, [r["id"] for r in picked], ["FAILED"], "replay", None)
        replayed += [str(row["id"]) for row in rows]
        if len(picked) < size:
            break
    more = len(replayed) >= MAX_REPLAY
    return json_response({"replayed": len(replayed), "ids": replayed, "more": more})


@endpoint("queue_purge")
async def purge_queue(request: Request) -> Response:
    """Cancel the queue's ENQUEUED tasks, then purge its broker queue.

    In this order, a failure midway leaves no ENQUEUED task without its
    envelope: the database failing stops the purge before the broker is touched
    (503); the broker failing leaves the cancelled tasks' envelopes, which the
    claim drops (``purged_messages`` null). A task that becomes ENQUEUED after
    the cancel (an enqueue, a retry) may lose its envelope to the broker purge:
    its publish is owed again afterwards, or, if that fails, by the sweeper,
    which ends every purge begun and not ended (``queue_purges``).
    """
    settings = _settings(request)
    name = request.path_params["name"]
    if name not in settings.queues:
        raise Problem(404, "Not found", f"no work queue {name!r}")
    confirm = request.query_params.getlist("confirm")
    if confirm != [name]:
        raise _bad("confirm", f"repeat the queue's name to confirm: ?confirm={name}")
    store = _client(request).store
    cancelled = 0
    after: uuid.UUID | None = None
    while True:  # bounded batches, each a short transaction; each row is visited once
        rows = await store.as_operator(
            "purge", actor(request), "queue purged", "queue_cancel_enqueued", name,
            PURGE_BATCH, after,
        )  # fmt: skip
        if not rows:
            break
        cancelled += len(rows)
        after = max(row["id"] for row in rows)
    purge = await store.fetchval("purge_begin", name)
    purged: int | None
    try:
        purged = await request.app.state.monitor.reader.purge(settings.topology().names.queue(name))
    except BrokerError:
        purged = None  # the cancelled tasks' envelopes are dropped at claim
    if purged != 0:  # something may have been dropped (the broker may have purged, unanswered)
        await store.execute("republish_queue", name)
    await store.execute("purge_end", purge)
    return json_response({"queue": name, "purged_messages": purged, "cancelled": cancelled})


@endpoint("workers")
async def list_workers(request: Request) -> Response:
    rows = await _client(request).store.fetch("workers_list", 3)
    return json_response({"workers": [dict(row) for row in rows]})


def routes() -> list[Route]:
    return [
        Route("/tasks", list_tasks, methods=["GET"]),
        Route("/tasks/{id}/cancel", cancel_task, methods=["POST"]),
        Route("/tasks/{id}/retry", retry_task, methods=["POST"]),
        Route("/dlq", list_dlq, methods=["GET"]),
        Route("/dlq/replay", replay_dlq, methods=["POST"]),
        Route("/queues/{name}", purge_queue, methods=["DELETE"]),
        Route("/workers", list_workers, methods=["GET"]),
    ]
