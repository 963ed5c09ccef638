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
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq._utils import preview
from taskq.enqueue.validation import TYPE_NAME, parse_rfc3339
from taskq.errors import BrokerError, FieldError, InvalidRequest, Problem
from taskq.model import (
    STATUS_BY_TEXT,
    STATUS_NAMES,
    Cursor,
    OwedPublish,
    Progress,
    TaskFilter,
    TaskRecord,
    TaskStatus,
)
from taskq.settings import QUEUE_NAME, Settings
from taskq.web.cursors import Cursors
from taskq.web.http import (
    actor,
    app_client,
    app_settings,
    bad,
    endpoint,
    json_response,
    one,
    read_json,
    task_id,
)

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


_DETAIL_FIELDS = tuple(field.name for field in fields(TaskRecord))
# A listing does not say why a publish was set aside, nor what limit a task waits for.
_LISTED_FIELDS = tuple(
    n
    for n in _DETAIL_FIELDS
    if n
    not in (
        "publish_error",
        "publish_retry_at",
        "progress",
        "unique",
        "limited_by",
        "limited_until",
        "workflow_id",
    )
)


def task_body(task: TaskRecord, *, detail: bool = True) -> dict[str, Any]:
    """A task as the API shows it: ``GET /tasks/{id}`` and the operator actions (with
    ``detail``: why a publish was set aside), and every listing."""
    body = {name: getattr(task, name) for name in (_DETAIL_FIELDS if detail else _LISTED_FIELDS)}
    for name in ("payload", "result"):
        body[name] = orjson.loads(body[name]) if body[name] is not None else None
    body["timeout"] = body.pop("timeout_seconds")
    if detail:
        body["progress"] = progress_body(task.progress)
        hold = task.unique
        body["unique"] = None if hold is None else {
            "key": hold.key, "while": hold.while_, "until": hold.until, "held": hold.held,
        }  # fmt: skip
    return body


def progress_body(progress: Progress | None) -> dict[str, Any] | None:
    """The latest progress report as the API shows it (None: none reported)."""
    if progress is None:
        return None
    details = orjson.loads(progress.details) if progress.details is not None else None
    return {
        "fraction": progress.fraction,
        "details": details,
        "attempt": progress.attempt,
        "at": progress.at,
    }


# ---------------------------------------------------------------- query parameters


def _limit(request: Request, include: frozenset[str]) -> int:
    """The page size; with ``include``, pages hold at most MAX_LIMIT_INCLUDED tasks."""
    text = one(request, "limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit() or len(text) > 4 or not 1 <= int(text) <= MAX_LIMIT:
        raise bad("limit", f"an integer from 1 to {MAX_LIMIT}")
    return min(int(text), MAX_LIMIT_INCLUDED) if include else int(text)


def _include(request: Request) -> frozenset[str]:
    values = {s.strip() for v in request.query_params.getlist("include") for s in v.split(",")}
    for value in values:
        if value not in INCLUDABLE:
            raise bad("include", f"{preview(value)} is not one of {', '.join(INCLUDABLE)}")
    return frozenset(values)


def _type(request: Request) -> str | None:
    text = one(request, "type")
    if text is not None and not TYPE_NAME.fullmatch(text):
        raise bad("type", "not a task type name")
    return text


def _queue(request: Request) -> str | None:
    text = one(request, "queue")
    if text is not None and not QUEUE_NAME.fullmatch(text):
        raise bad("queue", "not a queue name")
    return text


def _time(request: Request, name: str) -> datetime | None:
    text = one(request, name)
    if text is None:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise bad(name, str(exc)) from None


def _statuses(request: Request) -> list[TaskStatus] | None:
    values = {s.strip() for v in request.query_params.getlist("status") for s in v.split(",")}
    if not values:
        return None
    for value in values:
        if value not in STATUS_BY_TEXT:
            raise bad("status", f"{preview(value)} is not one of {', '.join(STATUS_NAMES)}")
    return sorted(STATUS_BY_TEXT[value] for value in values)


def _scheduled(request: Request) -> bool | None:
    text = one(request, "scheduled")
    if text is None:
        return None
    if text not in ("true", "false"):
        raise bad("scheduled", "true or false")
    return text == "true"


def _cursor(request: Request, listing: str) -> Cursor | None:
    text = one(request, "cursor")
    if text is None:
        return None
    try:
        return Cursor(*_cursors(request).decode(listing, text))
    except ValueError as exc:
        raise bad("cursor", str(exc)) from None


def _cursors(request: Request) -> Cursors:
    cursors: Cursors = request.app.state.cursors
    return cursors


def _page(
    request: Request, listing: str, found: list[TaskRecord], limit: int, include: frozenset[str]
) -> dict[str, Any]:
    more = len(found) > limit
    page = found[:limit]
    last = page[-1] if page and more else None
    cursor = None
    if last is not None:
        at = last.created_at if listing == "tasks" else last.finished_at
        assert at is not None  # the dead-letter listing shows finished tasks only
        cursor = _cursors(request).encode(listing, at, last.id)
    tasks = [task_body(task, detail=False) for task in page]
    for task in tasks:
        for name in set(INCLUDABLE) - include:
            del task[name]
    return {"tasks": tasks, "next_cursor": cursor}


# ---------------------------------------------------------------- endpoints


@endpoint("tasks")
async def list_tasks(request: Request) -> Response:
    include = _include(request)
    limit = _limit(request, include)
    cursor = _cursor(request, "tasks")
    filters = TaskFilter(
        statuses=_statuses(request),
        type=_type(request),
        queue=_queue(request),
        created_after=_time(request, "created_after"),
        created_before=_time(request, "created_before"),
        scheduled=_scheduled(request),
    )
    found = await app_client(request).store.list_tasks(
        filters,
        cursor,
        limit + 1,
        with_payload="payload" in include,
        with_result="result" in include,
    )
    return json_response(_page(request, "tasks", found, limit, include))


async def operator_reason(request: Request) -> str | None:
    """The optional ``{"reason": "..."}`` body of an operator action."""
    if not await _has_body(request):
        return None
    data = await read_json(request, 64 * 1024)
    if not isinstance(data, dict):
        raise bad("body", 'a JSON object, e.g. {"reason": "..."}')
    unknown = sorted(set(data) - {"reason"})
    if unknown:
        raise bad(unknown[0], "unknown field")
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise bad("reason", f"a string of at most {MAX_REASON} characters")
    if reason is not None and "\x00" in reason:
        raise bad("reason", "may not contain NUL")
    return reason


async def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in request.headers


def _conflict(task: TaskRecord, action: str) -> Problem:
    status = task.status
    return Problem(
        409,
        "Conflict",
        f"cannot {action} a task that is {status}",
        errors=[FieldError("status", f"the task is {status}")],
        extra={"task_status": status},
    )


async def _task_or_404(request: Request, row_id: uuid.UUID) -> TaskRecord:
    task = await app_client(request).store.task(row_id)
    if task is None:
        raise Problem(404, "Not found", "no such task")
    return task


@endpoint("task_cancel")
async def cancel_task(request: Request) -> Response:
    row_id = task_id(request)
    reason = await operator_reason(request)
    store = app_client(request).store
    status = await store.cancel(row_id, actor=actor(request), reason=reason)
    task = await _task_or_404(request, row_id)
    if status is None:
        raise _conflict(task, "cancel")
    return json_response(task_body(task), 202 if status == TaskStatus.RUNNING else 200)


@endpoint("task_retry")
async def retry_task(request: Request) -> Response:
    row_id = task_id(request)
    reason = await operator_reason(request)
    retryable = [TaskStatus.FAILED, TaskStatus.CANCELLED]
    rows = await _requeue(request, [row_id], retryable, "retry", reason)
    task = await _task_or_404(request, row_id)
    if not rows:
        raise _conflict(task, "retry")
    return json_response(task_body(task))


async def _requeue(
    request: Request,
    ids: list[uuid.UUID],
    statuses: list[TaskStatus],
    action: str,
    reason: str | None,
) -> list[OwedPublish]:
    """ENQUEUE ``ids`` that are in ``statuses`` again with fresh attempts, and publish them."""
    client = app_client(request)
    rows = await client.store.requeue(
        ids, statuses, action=action, actor=actor(request), reason=reason
    )
    for row in rows:
        if not client.outbox.submit(row):
            break  # the outbox is full: the relay publishes the rest
    return rows


@endpoint("dlq")
async def list_dlq(request: Request) -> Response:
    include = _include(request)
    limit = _limit(request, include)
    cursor = _cursor(request, "dlq")
    state = request.app.state
    found = await app_client(request).store.list_dead_letters(
        _type(request),
        _queue(request),
        cursor,
        limit + 1,
        with_payload="payload" in include,
        with_result="result" in include,
    )
    body = _page(request, "dlq", found, limit, include)
    dlq = app_settings(request).topology().names.dlq
    depths = await state.monitor.broker_depths()
    body["broker_messages"] = depths[dlq][0] if depths and dlq in depths else None
    return json_response(body)


def _replay_filter(
    data: Any, settings: Settings
) -> tuple[str | None, str | None, list[uuid.UUID] | None]:
    if not isinstance(data, dict):
        raise bad("body", 'a JSON object: {"type"?, "queue"?, "ids"?}')
    unknown = sorted(set(data) - {"type", "queue", "ids"})
    if unknown:
        raise bad(unknown[0], "unknown field")
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
    settings = app_settings(request)
    data = await read_json(request, 1024 * 1024) if await _has_body(request) else {}
    task_type, queue, ids = _replay_filter(data, settings)
    store = app_client(request).store
    replayed: list[str] = []
    # Bounded batches: each is one short transaction; a row replayed by a
    # concurrent call is FAILED no more and is not picked twice.
    while len(replayed) < MAX_REPLAY:
        size = min(REPLAY_BATCH, MAX_REPLAY - len(replayed))
        picked = await store.pick_dead_letters(task_type, queue, ids, size)
        if not picked:
            break
        rows = await _requeue(request, picked, [TaskStatus.FAILED], "replay", None)
        replayed += [str(row.id) for row in rows]
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
    settings = app_settings(request)
    name = request.path_params["name"]
    if name not in settings.queues:
        raise Problem(404, "Not found", f"no work queue {name!r}")
    confirm = request.query_params.getlist("confirm")
    if confirm != [name]:
        raise bad("confirm", f"repeat the queue's name to confirm: ?confirm={name}")
    store = app_client(request).store
    cancelled = 0
    after: uuid.UUID | None = None
    while True:  # bounded batches, each a short transaction; each row is visited once
        ids = await store.cancel_enqueued(
            name, limit=PURGE_BATCH, after=after, actor=actor(request), reason="queue purged"
        )
        if not ids:
            break
        cancelled += len(ids)
        after = max(ids)
    purge = await store.begin_purge(name)
    purged: int | None
    try:
        purged = await request.app.state.monitor.reader.purge(settings.topology().names.queue(name))
    except BrokerError:
        purged = None  # the cancelled tasks' envelopes are dropped at claim
    if purged != 0:  # something may have been dropped (the broker may have purged, unanswered)
        await store.republish_queue(name)
    await store.end_purge(purge)
    return json_response({"queue": name, "purged_messages": purged, "cancelled": cancelled})


@endpoint("workers")
async def list_workers(request: Request) -> Response:
    workers = await app_client(request).store.workers(missed_heartbeats=3)
    return json_response({"workers": [asdict(worker) for worker in workers]})


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
