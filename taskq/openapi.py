"""The OpenAPI 3.1 document of the HTTP API, built from the request models."""

from __future__ import annotations

from typing import Any

import taskq
from taskq.settings import Settings
from taskq.validation import EnqueueBody, TaskTypeBody

_TASK_ANSWER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "type": {"type": "string"},
        "queue": {"type": "string"},
        "status": {
            "type": "string",
            "enum": ["ENQUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"],
        },
        "attempts": {"type": "integer"},
        "max_attempts": {"type": "integer"},
        "run_at": {"type": "string", "format": "date-time"},
        "created_at": {"type": "string", "format": "date-time"},
    },
    "required": [
        "id",
        "type",
        "queue",
        "status",
        "attempts",
        "max_attempts",
        "run_at",
        "created_at",
    ],
}

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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


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
        409: "idempotency key used with another request",
        413: "body or payload too large",
        415: "not application/json",
        503: "database unavailable",
    }
    return {str(code): _problem(text[code]) for code in codes}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _path_param(name: str, fmt: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if fmt:
        schema["format"] = fmt
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document, with queue names from ``settings``."""
    enqueue_schema = EnqueueBody.model_json_schema(ref_template="#/components/schemas/{model}")
    enqueue_schema["properties"]["queue"] = {
        "anyOf": [{"type": "string", "enum": settings.queues}, {"type": "null"}],
        "default": None,
    }
    type_schema = TaskTypeBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components = {
        "EnqueueRequest": enqueue_schema,
        "EnqueueBatchRequest": {
            "type": "object",
            "properties": {
                "tasks": {
                    "type": "array",
                    "items": _ref("EnqueueRequest"),
                    "minItems": 1,
                    "maxItems": 1000,
                }
            },
            "required": ["tasks"],
            "additionalProperties": False,
        },
        "TaskTypeRequest": type_schema,
        "EnqueueAnswer": _TASK_ANSWER,
        "Problem": _PROBLEM,
        **type_schema.pop("$defs", {}),
    }
    task_id = _path_param("id", "uuid")
    type_name = _path_param("name")
    obj = {"type": "object"}
    paths = {
        "/": {
            "get": {
                "summary": "Service information",
                "responses": {"200": _json(obj, "service, version, namespace, queues")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Health of the database, broker and topology",
                "responses": {
                    "200": _json(obj, "ok, or degraded while the broker is down"),
                    "503": _problem("a part is failing"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json(obj, "OpenAPI 3.1")}}
        },
        "/enqueue": {
            "post": {
                "summary": "Enqueue one task",
                "requestBody": _body("EnqueueRequest"),
                "responses": {
                    "201": _json(_ref("EnqueueAnswer"), "created"),
                    "200": _json(
                        _ref("EnqueueAnswer"),
                        "idempotent replay (header Idempotent-Replayed: true)",
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
                    "201": _json(obj, "created (tasks: answers with `replayed`)"),
                    "200": _json(obj, "every task was an idempotent replay"),
                    **_errors(400, 401, 409, 413, 415, 503),
                },
            }
        },
        "/tasks/{id}": {
            "get": {
                "summary": "One task",
                "parameters": [task_id],
                "responses": {"200": _json(obj, "the task"), **_errors(401, 404, 503)},
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
                    "200": _json(obj, "replaced"),
                    **_errors(400, 401, 413, 415, 503),
                },
            },
        },
    }
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
