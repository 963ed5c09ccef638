"""Pausing work queues: ``GET /queues``, ``POST /queues/{name}/pause`` and ``/resume``
(the purge, ``DELETE /queues/{name}``, is in :mod:`taskq.web.admin`).

A paused queue is consumed by no worker; enqueues go on, its tasks stay ENQUEUED
and their envelopes wait in RabbitMQ until it is resumed. The pause is a row in
``queue_pauses`` (migration 0014), so it outlives every process; the workers
learn of it within moments (see :mod:`taskq.worker.pauses`).

Names: a name that cannot be a queue's (``TASKQ_QUEUES``' format) is a 400. A
well-formed name that is not in ``TASKQ_QUEUES`` is a 404 for a pause, as for a
purge and an enqueue: nothing can be enqueued to it. Any queue of ``TASKQ_QUEUES``
may be paused, whether a worker consumes it or not (a worker that starts later
does not consume it). A resume of a name outside ``TASKQ_QUEUES`` that is paused
(the setting changed since) ends its pause; else it is a 404 too. Pausing a
paused queue and resuming a running one change nothing (``changed``: false); a
pause keeps its first time, author and reason.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq._utils import preview
from taskq.errors import FieldError, InvalidRequest, Problem
from taskq.model import QueuePause
from taskq.settings import QUEUE_NAME
from taskq.web.admin import operator_reason
from taskq.web.http import actor, app_client, app_settings, endpoint, json_response

log = logging.getLogger("taskq.api")


def pause_body(queue: str, pause: QueuePause | None) -> dict[str, Any]:
    """A queue's pause as the API shows it (None: it is not paused)."""
    return {
        "queue": queue,
        "paused": pause is not None,
        "paused_at": None if pause is None else pause.paused_at,
        "paused_by": None if pause is None else pause.paused_by,
        "reason": None if pause is None else pause.reason,
    }


def _name(request: Request) -> str:
    name: str = request.path_params["name"]
    if not QUEUE_NAME.fullmatch(name):
        raise InvalidRequest([FieldError("name", f"{preview(name)} cannot name a queue")])
    return name


def _unknown(name: str) -> Problem:
    return Problem(404, "Not found", f"no work queue {name!r} (see TASKQ_QUEUES)")


@endpoint("queues")
async def list_queues(request: Request) -> Response:
    settings = app_settings(request)
    pauses = {pause.queue: pause for pause in await app_client(request).store.queue_pauses()}
    depths = await request.app.state.monitor.broker_depths()
    names = settings.topology().names
    queues = []
    for queue in [*settings.queues, *sorted(set(pauses) - set(settings.queues))]:
        messages, consumers = (depths or {}).get(names.queue(queue), (None, None))
        body = pause_body(queue, pauses.get(queue))
        body.update(configured=queue in settings.queues, messages=messages, consumers=consumers)
        queues.append(body)
    return json_response({"queues": queues, "broker_available": depths is not None})


@endpoint("queue_pause")
async def pause_queue(request: Request) -> Response:
    name = _name(request)
    if name not in app_settings(request).queues:
        raise _unknown(name)
    reason = await operator_reason(request)
    who = actor(request)
    pause, changed = await app_client(request).store.pause_queue(name, paused_by=who, reason=reason)
    request.app.state.monitor.forget_pauses()
    if changed:
        log.info("queue %s paused by %s%s", name, who, f": {reason}" if reason else "")
    return json_response({**pause_body(name, pause), "changed": changed})


@endpoint("queue_resume")
async def resume_queue(request: Request) -> Response:
    name = _name(request)
    reason = await operator_reason(request)
    ended = await app_client(request).store.resume_queue(name)
    if ended is None and name not in app_settings(request).queues:
        raise _unknown(name)
    request.app.state.monitor.forget_pauses()
    if ended is not None:
        who = actor(request)
        log.info("queue %s resumed by %s%s", name, who, f": {reason}" if reason else "")
    return json_response({**pause_body(name, None), "changed": ended is not None})


def routes() -> list[Route]:
    return [
        Route("/queues", list_queues, methods=["GET"]),
        Route("/queues/{name}/pause", pause_queue, methods=["POST"]),
        Route("/queues/{name}/resume", resume_queue, methods=["POST"]),
    ]
