"""The OpenAPI 3.1 document of the HTTP API, built from the request models."""

from __future__ import annotations

from typing import Any

import taskq
from taskq import ratelimits
from taskq.enqueue.validation import TYPE_NAME
from taskq.fleet.schedules import SCHEDULE_NAME
from taskq.model import STATUS_NAMES
from taskq.settings import QUEUE_NAME, Settings
from taskq.web import workflows
from taskq.web.openapi_schemas import body_schemas
from taskq.web.openapi_schemas import ref as _ref

_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; `field` names the first field at fault.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "required": ["type", "title", "status", "detail"],
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "invalid request (the field is named)",
        401: "missing or wrong API key",
        404: "not found",
        409: "conflict: a key used with another request, a task in the wrong status,"
        " or a full task type registry (TASKQ_MAX_TASK_TYPES)",
        413: "body or payload too large",
        415: "not application/json (required on every request that changes state)",
        429: "too many open streams (TASKQ_MAX_STREAMS)",
        503: "database unavailable (or, for a long-poll, too many waiters: TASKQ_MAX_WAITERS)",
    }
    return {str(code): _problem(text[code]) for code in codes}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _state_change_body(schema: dict[str, Any]) -> dict[str, Any]:
    """The body of a request that changes state: it must say it is JSON (CSRF), even empty."""
    return {
        "required": True,
        "description": "Content-Type: application/json is required; an empty body is"
        " accepted with it (415 without it).",
        "content": {"application/json": {"schema": schema}},
    }


def _path_param(name: str, fmt: str | None = None, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if fmt:
        schema["format"] = fmt
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _schedule_paths() -> dict[str, Any]:
    """The schedules (taskq.web.schedules)."""
    obj = {"type": "object"}
    name = _path_param("name", pattern=SCHEDULE_NAME.pattern)
    action = _state_change_body({"description": "ignored"})
    schedule = _json(obj, "the schedule, with its next fires (upcoming)")

    def change(summary: str, answer: dict[str, Any], status: str = "200") -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "parameters": [name],
                "requestBody": action,
                "responses": {status: answer, **_errors(401, 404, 409, 415, 503)},
            }
        }

    return {
        "/schedules": {
            "get": {
                "summary": "Schedules in name order, with their next fires",
                "parameters": [
                    _query(
                        "after",
                        {"type": "string", "pattern": SCHEDULE_NAME.pattern},
                        "next_after of the previous page",
                    ),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                        "page size",
                    ),
                ],
                "responses": {"200": _json(obj, "schedules and next_after"), **_errors(401, 503)},
            }
        },
        "/schedules/{name}": {
            "get": {
                "summary": "One schedule",
                "parameters": [name],
                "responses": {"200": schedule, **_errors(401, 404, 503)},
            },
            "put": {
                "summary": "Create or replace a schedule (cron in a time zone, or an interval)",
                "parameters": [name],
                "requestBody": _body("ScheduleRequest"),
                "responses": {
                    "201": _json(obj, "created"),
                    "200": _json(obj, "replaced (its next fire kept if the timing is the same)"),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            },
            "delete": {
                "summary": "Delete a schedule (tasks it enqueued stay)",
                "parameters": [name],
                "requestBody": action,
                "responses": {"200": _json(obj, "deleted"), **_errors(401, 404, 415, 503)},
            },
        },
        "/schedules/{name}/pause": change("Pause a schedule: no fire until resumed", schedule),
        "/schedules/{name}/resume": change(
            "Resume a schedule from its first fire after now (the pause is not caught up)",
            schedule,
        ),
        "/schedules/{name}/trigger": change(
            "Enqueue the schedule's task now, paused or not; its fires do not move",
            _json(obj, "task_id and the schedule"),
            "201",
        ),
    }


def _queue_paths() -> dict[str, Any]:
    """Pausing work queues (taskq.web.queues)."""
    name = _path_param("name", pattern=QUEUE_NAME.pattern)
    reason = _state_change_body(_ref("ReasonRequest"))

    def change(summary: str, answer: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "parameters": [name],
                "requestBody": reason,
                "responses": {
                    "200": _json({"type": "object"}, answer),
                    **_errors(400, 401, 404, 413, 415, 503),
                },
            }
        }

    return {
        "/queues": {
            "get": {
                "summary": "Work queues: paused or not (and since when, by whom, why),"
                " broker messages and consumers",
                "responses": {
                    "200": _json({"type": "object"}, "queues, broker_available"),
                    **_errors(401, 503),
                },
            }
        },
        "/queues/{name}/pause": change(
            "Pause a queue of TASKQ_QUEUES: no worker takes its tasks until it is resumed"
            " (enqueues go on)",
            "queue, paused (true), paused_at, paused_by, reason; changed (false: it was"
            " paused already, and keeps that pause)",
        ),
        "/queues/{name}/resume": change(
            "Resume a paused queue: the workers consume it again",
            "queue, paused (false); changed (false: it was not paused)",
        ),
    }


def _limit_paths() -> dict[str, Any]:
    """The rate limiters (taskq.web.limits)."""
    obj = {"type": "object"}
    name = _path_param("name")
    limiter = _json(obj, "the limiter, with the types that use it")
    return {
        "/limits": {
            "get": {
                "summary": "Rate limiters in name order (operators' and the types' own)",
                "responses": {"200": _json(obj, "limits"), **_errors(401, 503)},
            }
        },
        "/limits/{name}": {
            "get": {
                "summary": "One rate limiter",
                "parameters": [name],
                "responses": {"200": limiter, **_errors(401, 404, 503)},
            },
            "put": {
                "summary": "Create or replace a rate limiter: limit starts per interval,"
                " optionally one bucket per value of a payload field",
                "parameters": [_path_param("name", pattern=ratelimits.LIMITER_NAME.pattern)],
                "requestBody": _body("LimitRequest"),
                "responses": {
                    "201": _json(obj, "created"),
                    "200": _json(obj, "replaced (its buckets keep their place)"),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            },
            "delete": {
                "summary": "Delete a rate limiter no type uses (409 while one does)",
                "parameters": [name],
                "requestBody": _state_change_body({"description": "ignored"}),
                "responses": {"200": _json(obj, "deleted"), **_errors(401, 404, 409, 415, 503)},
            },
        },
    }


def _admin_paths(settings: Settings) -> dict[str, Any]:
    """The admin operations (taskq.web.admin and taskq.web.monitor)."""
    obj = {"type": "object"}
    task_id = _path_param("id", "uuid")
    type_filter = _query("type", {"type": "string", "pattern": TYPE_NAME.pattern}, "task type")
    queue_filter = _query("queue", {"type": "string", "enum": settings.queues}, "work queue")
    limit = _query(
        "limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "page size"
    )
    cursor = _query("cursor", {"type": "string"}, "next_cursor of the previous page")
    include = _query(
        "include",
        {"type": "array", "items": {"type": "string", "enum": ["payload", "result"]}},
        "add payload and/or result to each task (comma-separated); a page then holds"
        " at most 50 tasks",
    )
    status = {"type": "string", "enum": list(STATUS_NAMES)}
    page = _json(obj, "tasks (as GET /tasks/{id}) and next_cursor (null on the last page)")
    reason = _state_change_body(_ref("ReasonRequest"))
    return {
        "/tasks": {
            "get": {
                "summary": "Tasks, newest first, keyset-paginated",
                "parameters": [
                    _query(
                        "status",
                        {"type": "array", "items": status},
                        "repeat it or separate with commas",
                    ),
                    type_filter,
                    queue_filter,
                    _query("created_after", {"type": "string", "format": "date-time"}, "RFC 3339"),
                    _query("created_before", {"type": "string", "format": "date-time"}, "RFC 3339"),
                    _query(
                        "scheduled",
                        {"type": "string", "enum": ["true", "false"]},
                        "ENQUEUED with run_at in the future",
                    ),
                    limit,
                    cursor,
                    include,
                ],
                "responses": {"200": page, **_errors(400, 401, 503)},
            }
        },
        "/tasks/{id}/cancel": {
            "post": {
                "summary": "Cancel a task: ENQUEUED or WAITING at once, RUNNING cooperatively",
                "parameters": [task_id],
                "requestBody": reason,
                "responses": {
                    "200": _json(obj, "cancelled (it was ENQUEUED or WAITING)"),
                    "202": _json(obj, "cancel requested (it is RUNNING)"),
                    **_errors(400, 401, 404, 409, 413, 415, 503),
                },
            }
        },
        "/tasks/{id}/retry": {
            "post": {
                "summary": "Enqueue a FAILED or CANCELLED task again with fresh attempts",
                "parameters": [task_id],
                "requestBody": reason,
                "responses": {
                    "200": _json(obj, "the task, ENQUEUED"),
                    **_errors(400, 401, 404, 409, 413, 415, 503),
                },
            }
        },
        "/dlq": {
            "get": {
                "summary": "FAILED tasks, newest failure first, and the broker DLQ's depth",
                "parameters": [type_filter, queue_filter, limit, cursor, include],
                "responses": {"200": page, **_errors(400, 401, 503)},
            }
        },
        "/dlq/replay": {
            "post": {
                "summary": "Enqueue FAILED tasks again (all, or by type, queue or ids)",
                "requestBody": _state_change_body(_ref("ReplayRequest")),
                "responses": {
                    "200": _json(obj, "replayed (count), ids, more (the cap was reached)"),
                    **_errors(400, 401, 413, 415, 503),
                },
            }
        },
        "/queues/{name}": {
            "delete": {
                "summary": "Purge a work queue and cancel its ENQUEUED tasks",
                "requestBody": _state_change_body({"description": "ignored"}),
                "parameters": [
                    {**_path_param("name"), "schema": {"type": "string", "enum": settings.queues}},
                    {
                        **_query("confirm", {"type": "string"}, "the queue's name again"),
                        "required": True,
                    },
                ],
                "responses": {
                    "200": _json(obj, "queue, purged_messages (null: broker down), cancelled"),
                    **_errors(400, 401, 404, 415, 503),
                },
            }
        },
        "/workers": {
            "get": {
                "summary": "Workers, with their queues, concurrency, in-flight count, heartbeat",
                "responses": {"200": _json(obj, "workers"), **_errors(401, 503)},
            }
        },
        "/stats": {
            "get": {
                "summary": "Counts by status, queue and type; broker depths; rates and latency",
                "responses": {"200": _json(obj, "stats"), **_errors(401, 503)},
            }
        },
        "/stream": {
            "get": {
                "summary": "Server-Sent Events: `stats` every second, `task` per task event",
                "responses": {
                    "200": {
                        "description": "an endless event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, 429, 503),
                },
            }
        },
    }


def _workflow_paths() -> dict[str, Any]:
    """Workflows (taskq.web.workflows)."""
    obj = {"type": "object"}
    workflow_id = _path_param("id", "uuid")
    return {
        "/workflows": {
            "post": {
                "summary": "Enqueue a workflow: a DAG of tasks, each run once the nodes it"
                " depends on have succeeded",
                "requestBody": _body("WorkflowRequest"),
                "responses": {
                    "201": _json(obj, "created: id, name, status, on_failure, nodes"),
                    "200": _json(obj, "idempotent replay: the workflow as it is"),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            },
            "get": {
                "summary": "Workflows, newest first",
                "parameters": [
                    _query(
                        "status",
                        {"type": "string", "enum": list(workflows.STATUS_NAMES)},
                        "only workflows in this status",
                    ),
                    _query("name", {"type": "string", "minLength": 1, "maxLength": 200}, "by name"),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": workflows.MAX_LIMIT},
                        "page size",
                    ),
                    _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                ],
                "responses": {
                    "200": _json(obj, "workflows and next_cursor"),
                    **_errors(400, 401, 503),
                },
            },
        },
        "/workflows/{id}": {
            "get": {
                "summary": "A workflow: status, counts, nodes with their tasks' states and"
                " timings, edges",
                "parameters": [workflow_id],
                "responses": {"200": _json(obj, "the workflow"), **_errors(401, 404, 503)},
            }
        },
        "/workflows/{id}/cancel": {
            "post": {
                "summary": "Cancel a workflow: nodes not started are CANCELLED, running ones"
                " are asked to stop, nothing more is released",
                "parameters": [workflow_id],
                "requestBody": _state_change_body(_ref("ReasonRequest")),
                "responses": {
                    "200": _json(obj, "the workflow"),
                    **_errors(400, 401, 404, 409, 413, 415, 503),
                },
            }
        },
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document, with queue names and limits from ``settings``."""
    components = {**body_schemas(settings), "Problem": _PROBLEM}
    components.update(workflows.request_schemas(settings, components["EnqueueRequest"]))
    task_id = _path_param("id", "uuid")
    type_name = _path_param("name", pattern=TYPE_NAME.pattern)
    wait = _query(
        "wait",
        {"type": "number", "minimum": 0, "maximum": settings.max_wait},
        "seconds to wait for the task to end (TASKQ_MAX_WAIT at most): answered as soon"
        " as it is SUCCEEDED, FAILED or CANCELLED, or as it is when the time is up;"
        " 503 when the process waits for TASKQ_MAX_WAITERS tasks already",
    )
    obj = {"type": "object"}
    paths: dict[str, dict[str, Any]] = {
        "/": {
            "get": {
                "summary": "Service information",
                "security": [],
                "responses": {"200": _json(obj, "service, version, namespace, queues")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Health of the database, broker and topology",
                "security": [],
                "responses": {
                    "200": _json(obj, "ok, or degraded while the broker is down"),
                    "503": _problem("a part is failing"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json(obj, "OpenAPI 3.1")},
            }
        },
        "/enqueue": {
            "post": {
                "summary": "Enqueue one task",
                "requestBody": _body("EnqueueRequest"),
                "responses": {
                    "201": _json(_ref("EnqueueAnswer"), "created"),
                    "200": _json(
                        _ref("EnqueueAnswer"),
                        "idempotent replay (header Idempotent-Replayed: true), or a duplicate"
                        " of a unique task, which answers (header Unique-Duplicate: kept or"
                        " replaced; duplicate: true)",
                    ),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            }
        },
        "/enqueue/batch": {
            "post": {
                "summary": "Enqueue up to 1000 tasks, all or nothing",
                "requestBody": _body("EnqueueBatchRequest"),
                "responses": {
                    "201": _json(
                        obj, "created (tasks: answers with `replayed`, duplicates with `duplicate`)"
                    ),
                    "200": _json(obj, "nothing created: idempotent replays and duplicates"),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            }
        },
        "/tasks/{id}": {
            "get": {
                "summary": "One task; with ?wait=, once it has ended (a long-poll)",
                "parameters": [task_id, wait],
                "responses": {
                    "200": _json(_ref("Task"), "the task (with ?wait=: ended, or as it is)"),
                    **_errors(400, 401, 404, 503),
                },
            }
        },
        "/tasks/{id}/events": {
            "get": {
                "summary": "A task's event history",
                "parameters": [task_id],
                "responses": {"200": _json(obj, "events, oldest first"), **_errors(401, 404, 503)},
            }
        },
        "/types": {
            "get": {
                "summary": "Registered task types",
                "responses": {"200": _json(obj, "types"), **_errors(401, 503)},
            }
        },
        "/types/{name}": {
            "get": {
                "summary": "One task type",
                "parameters": [type_name],
                "responses": {"200": _json(obj, "the type"), **_errors(401, 404, 503)},
            },
            "put": {
                "summary": "Create or replace a task type",
                "parameters": [type_name],
                "requestBody": _body("TaskTypeRequest"),
                "responses": {
                    "201": _json(obj, "created"),
                    "200": _json(obj, "replaced (its pause kept)"),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            },
        },
        "/types/{name}/pause": {
            "post": {
                "summary": "Pause a task type: claims park its tasks WAITING; enqueue goes on",
                "parameters": [type_name],
                "requestBody": _state_change_body({"description": "ignored"}),
                "responses": {"200": _json(obj, "the type"), **_errors(401, 404, 415, 503)},
            }
        },
        "/types/{name}/resume": {
            "post": {
                "summary": "Resume a task type and release every task its pause parked",
                "parameters": [type_name],
                "requestBody": _state_change_body({"description": "ignored"}),
                "responses": {"200": _json(obj, "the type"), **_errors(401, 404, 415, 503)},
            }
        },
        "/types/{name}/concurrency": {
            "get": {
                "summary": "The busiest keys of a type's concurrency limit: running, waiting",
                "parameters": [
                    type_name,
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "keys at most",
                    ),
                ],
                "responses": {
                    "200": _json(obj, "type, limit, key and keys"),
                    **_errors(400, 401, 404, 503),
                },
            }
        },
    }
    paths.update(_admin_paths(settings))
    paths.update(_schedule_paths())
    paths.update(_queue_paths())
    paths.update(_limit_paths())
    paths.update(_workflow_paths())
    for item in paths.values():  # the Host check (taskq.web.hosts) runs before every route
        for operation in item.values():
            operation["responses"].setdefault("400", _problem("a Host not in TASKQ_ALLOWED_HOSTS"))
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskq", "version": taskq.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}] if settings.api_keys else [],
    }
