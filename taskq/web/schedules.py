"""The schedules API: ``PUT``, ``GET`` and ``DELETE /schedules/{name}``, ``GET /schedules``,
and ``POST /schedules/{name}/pause``, ``/resume`` and ``/trigger``.

A schedule enqueues its type with its payload at each fire (see
:mod:`taskq.fleet.scheduler`); the active sweeper of the workers fires it. A
``PUT`` is checked as an enqueue would be (the type exists and is enabled, the
queue is known, the payload fits the type's schema), and takes the first fire
after now, unless the schedule exists with the same timing: then it keeps its
next fire, so re-declaring a schedule moves nothing. Resuming a paused schedule
takes the first fire after now (the fires of the pause are not caught up); a
trigger enqueues one task now, paused or not, and moves no fire.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskq._utils import preview
from taskq.client import Client
from taskq.enqueue import task_types
from taskq.errors import (
    CronProblem,
    FieldError,
    InvalidRequest,
    Overrun,
    Problem,
    TaskqError,
    TooManySchedules,
)
from taskq.fleet import schedules
from taskq.fleet.scheduler import timetable_of
from taskq.fleet.schedules import SCHEDULE_NAME, first_fire, schedule_body, schedule_spec
from taskq.model import ScheduleRecord
from taskq.web.http import app_client, app_settings, endpoint, json_response, read_json

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
_LIMIT = re.compile(r"^[0-9]{1,3}$")


def _name(request: Request) -> str:
    name: str = request.path_params["name"]
    if not SCHEDULE_NAME.match(name):
        raise Problem(404, "Not found", f"no schedule {preview(name)}")
    return name


def _body(schedule: ScheduleRecord) -> dict[str, object]:
    try:
        table = timetable_of(schedule)
    except CronProblem:  # its zone left the tz database: shown, not fired
        table = None
    return schedule_body(schedule, table)


async def _found(client: Client, name: str) -> ScheduleRecord:
    schedule = await client.store.schedule(name)
    if schedule is None:
        raise Problem(404, "Not found", f"no schedule {name!r}")
    return schedule


@endpoint("schedules")
async def list_schedules(request: Request) -> Response:
    after = request.query_params.get("after")
    if after is None:
        after = ""  # from the first
    elif not SCHEDULE_NAME.match(after):
        raise InvalidRequest([FieldError("after", "a schedule name")])
    text = request.query_params.get("limit")
    limit = DEFAULT_LIMIT
    if text is not None:
        if not _LIMIT.match(text) or not 1 <= int(text) <= MAX_LIMIT:
            raise InvalidRequest([FieldError("limit", f"an integer from 1 to {MAX_LIMIT}")])
        limit = int(text)
    schedules = await app_client(request).store.schedules(after, limit + 1)
    page = schedules[:limit]
    return json_response(
        {
            "schedules": [_body(s) for s in page],
            "next_after": page[-1].name if len(schedules) > limit else None,
        }
    )


@endpoint("schedule")
async def get_schedule(request: Request) -> Response:
    return json_response(_body(await _found(app_client(request), _name(request))))


@endpoint("schedule_put")
async def put_schedule(request: Request) -> Response:
    settings = app_settings(request)
    client = app_client(request)
    data = await read_json(request, settings.max_payload_bytes)
    spec, table = schedule_spec(request.path_params["name"], data)
    await _check_enqueue(client, spec.type, spec.queue, data.get("payload", {}))
    now = await client.store.database_now()
    try:
        schedule = await client.store.put_schedule(
            spec, first_fire(table, now), max_schedules=settings.max_schedules
        )
    except TooManySchedules as exc:
        raise Problem(
            409, "Conflict", str(exc), errors=[FieldError("name", "too many schedules")]
        ) from None
    return json_response(schedule_body(schedule, table), 201 if schedule.created else 200)


@endpoint("schedule_delete")
async def delete_schedule(request: Request) -> Response:
    name = _name(request)
    if not await app_client(request).store.delete_schedule(name):
        raise Problem(404, "Not found", f"no schedule {name!r}")
    return json_response({"deleted": name})


@endpoint("schedule_pause")
async def pause_schedule(request: Request) -> Response:
    return await _pause(request, paused=True)


@endpoint("schedule_resume")
async def resume_schedule(request: Request) -> Response:
    return await _pause(request, paused=False)


async def _pause(request: Request, *, paused: bool) -> Response:
    name = _name(request)
    try:
        changed = await schedules.set_paused(app_client(request).store, name, paused=paused)
    except CronProblem as exc:
        raise Problem(409, "Conflict", f"the schedule cannot fire: {exc}") from None
    if changed is None:
        raise Problem(404, "Not found", f"no schedule {name!r}")
    return json_response(_body(changed))


@endpoint("schedule_trigger")
async def trigger_schedule(request: Request) -> Response:
    client = app_client(request)
    name = _name(request)
    try:
        fired = await schedules.fire_now(client.store, client.publisher, name)
    except TaskqError as exc:
        raise Problem(503, "Service unavailable", str(exc)) from None
    if fired is None:
        raise Problem(404, "Not found", f"no schedule {name!r}")
    schedule, task_id = fired
    if task_id is None:
        raise Problem(
            409, "Conflict", schedule.last_error or f"task type {schedule.type!r} is unusable"
        )
    return json_response({"task_id": task_id, "schedule": _body(schedule)}, 201)


async def _check_enqueue(client: Client, name: str, queue: str | None, payload: object) -> None:
    """The checks of an enqueue of type ``name``: it exists and is enabled, the queue is
    known and the payload fits its schema."""
    settings = client.settings
    if queue is not None and queue not in settings.queues:
        raise InvalidRequest([FieldError("queue", f"not one of {', '.join(settings.queues)}")])
    task_type = task_types.check_type(
        await client.types.get(name), name, queue, settings.queues, ""
    )
    if task_type.validator is None or not isinstance(payload, dict):
        return  # no schema; or not an object, which schedule_spec refused already
    deadline = task_types.check_deadline(1)
    try:
        errors = await client.offload.run(
            deadline, task_types.check_payloads, [("", task_type, payload)], [0]
        )
    except Overrun:
        message = f"checking it against the type's payload_schema took over {deadline:g}s"
        raise InvalidRequest([FieldError("payload", message)]) from None
    if errors:
        raise errors[0]


def routes() -> list[Route]:
    return [
        Route("/schedules", list_schedules, methods=["GET"]),
        Route("/schedules/{name}", get_schedule, methods=["GET"]),
        Route("/schedules/{name}", put_schedule, methods=["PUT"]),
        Route("/schedules/{name}", delete_schedule, methods=["DELETE"]),
        Route("/schedules/{name}/pause", pause_schedule, methods=["POST"]),
        Route("/schedules/{name}/resume", resume_schedule, methods=["POST"]),
        Route("/schedules/{name}/trigger", trigger_schedule, methods=["POST"]),
    ]
