"""The JSON Schemas of the HTTP API's bodies and values, for the OpenAPI document.

Payloads, results and payload schemas are free-form JSON, described so that client
generators read them (openapi-python-client cannot follow a schema that refers to itself
other than through an object) while validators and fuzzers still see every rule the API
checks. ``tests/integration/test_openapi_client.py`` generates a client and uses it.
"""

from __future__ import annotations

from typing import Any

from taskq import ratelimits
from taskq._utils import DURATION_PATTERN, format_duration
from taskq.enqueue.validation import TYPE_NAME, EnqueueBody, TaskTypeBody
from taskq.fleet.schedules import ScheduleBody
from taskq.model import STATUS_NAMES, WaitReason
from taskq.settings import Settings
from taskq.store import ANSWER_FIELDS
from taskq.unique import MAX_FOR_SECONDS, UniqueBody

# Postgres text and jsonb cannot hold NUL, so no string the API stores may contain one.
NO_NUL = r"^[^\x00]*$"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "default": None, **extra}


# A JSON value whose strings and member names are free of NUL. Objects recurse through
# JsonObject, which every generator follows. Arrays do not name JsonValue in `items`:
# openapi-python-client cannot parse a union whose member refers back to the union.
# To a generator an item is any value (`items: {}`); a validator still checks each one
# ("no item is not a JsonValue").
_JSON_VALUE = {
    "description": "Any JSON value; no string or member name in it contains NUL (\\u0000).",
    "anyOf": [
        {"type": ["null", "boolean", "number"]},
        {"type": "string", "pattern": NO_NUL},
        {"type": "array", "items": {}, "not": {"contains": {"not": ref("JsonValue")}}},
        ref("JsonObject"),
    ],
}
_JSON_OBJECT = {
    "type": "object",
    "description": "A JSON object; no string or member name in it contains NUL (\\u0000).",
    "propertyNames": {"pattern": NO_NUL},
    "additionalProperties": ref("JsonValue"),
}

_TASK_ANSWER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "type": {"type": "string"},
        "queue": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUS_NAMES)},
        "attempts": {"type": "integer"},
        "max_attempts": {"type": "integer"},
        "run_at": {"type": "string", "format": "date-time"},
        "created_at": {"type": "string", "format": "date-time"},
    },
    "required": list(ANSWER_FIELDS),
}

# The answer to an enqueue: the task's, and for a duplicate of a unique task, two flags.
_ENQUEUE_ANSWER = {
    **_TASK_ANSWER,
    "properties": {
        **_TASK_ANSWER["properties"],  # type: ignore[dict-item]
        "duplicate": {
            "type": "boolean",
            "description": "Only in a duplicate's answer (header Unique-Duplicate): another"
            " task held the unique key; that task answers and nothing was created.",
        },
        "replaced": {
            "type": "boolean",
            "description": "With duplicate: the holder took this enqueue's payload and run_at.",
        },
    },
}

_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_TEXT_OR_NULL = {"type": ["string", "null"]}
_TASK = {
    "type": "object",
    "description": "A task as `GET /tasks/{id}` shows it.",
    "properties": {
        **_TASK_ANSWER["properties"],  # type: ignore[dict-item]
        "payload": {**ref("JsonObject"), "description": "The handler's input."},
        "result": {
            **ref("JsonValue"),
            "description": "What the handler returned; null until it succeeds.",
        },
        "idempotency_key": _TEXT_OR_NULL,
        "last_error": {**_TEXT_OR_NULL, "description": "Why the last attempt failed."},
        "timeout": {"type": "number", "description": "Handler timeout (s)."},
        "lease_expires_at": _TIME_OR_NULL,
        "worker_id": _TEXT_OR_NULL,
        "published_at": _TIME_OR_NULL,
        "updated_at": {"type": "string", "format": "date-time"},
        "started_at": _TIME_OR_NULL,
        "finished_at": _TIME_OR_NULL,
        "cancel_requested_at": _TIME_OR_NULL,
        "replays": {"type": "integer", "description": "Times an operator enqueued it again."},
        "scheduled": {"type": "boolean", "description": "ENQUEUED with run_at in the future."},
        "wait_reason": {
            "anyOf": [
                {"type": "string", "enum": [r.value for r in WaitReason]},
                {"type": "null"},
            ],
            "description": "Why a WAITING task may not be claimed: its type is paused,"
            " its concurrency key has no free slot, or (a workflow node) its parents"
            " have not all succeeded. Null otherwise.",
        },
        "workflow_id": {
            **_TEXT_OR_NULL,
            "format": "uuid",
            "description": "The workflow whose node it is (GET /workflows/{id}); null for a"
            " task enqueued alone. In GET /tasks/{id} only.",
        },
        "progress": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                        "details": {"anyOf": [ref("JsonObject"), {"type": "null"}]},
                        "attempt": {"type": "integer"},
                        "at": {"type": "string", "format": "date-time"},
                    },
                    "required": ["fraction", "details", "attempt", "at"],
                },
                {"type": "null"},
            ],
            "description": "The latest progress its handler reported (ctx.progress); in"
            " GET /tasks/{id} only.",
        },
        "unique": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "key": {**_TEXT_OR_NULL, "description": "type/key; null: released."},
                        "while": {"type": "string", "enum": ["queued", "active", "until_finished"]},
                        "until": _TIME_OR_NULL,
                        "held": {"type": "boolean", "description": "Whether it holds the key now."},
                    },
                    "required": ["key", "while", "until", "held"],
                },
                {"type": "null"},
            ],
            "description": "A unique task's key and whether it holds it; in GET /tasks/{id} only.",
        },
    },
    "required": [*ANSWER_FIELDS, "payload", "result", "last_error"],
}


def _enqueue_schema(settings: Settings) -> dict[str, Any]:
    """The enqueue request: the model's schema plus the rules validation checks by hand."""
    schema = EnqueueBody.model_json_schema(ref_template="#/components/schemas/{model}")
    # Generators name a class after the title: the same name as the component.
    schema["title"] = "EnqueueRequest"
    props = schema["properties"]
    props["type"]["pattern"] = TYPE_NAME.pattern
    props["payload"] = {
        **ref("JsonObject"),
        "description": props["payload"]["description"]
        + " Strings may not contain NUL (\\u0000); at most TASKQ_MAX_PAYLOAD_BYTES.",
    }
    props["queue"] = nullable({"type": "string", "enum": settings.queues})
    key = props["idempotency_key"]
    key["anyOf"][0]["pattern"] = NO_NUL
    props["delay"]["anyOf"][0]["maximum"] = settings.max_delay
    props["run_at"] = nullable(
        {"type": "string", "format": "date-time"},
        description="RFC 3339 time before which it may not start; at most "
        f"TASKQ_MAX_DELAY ({format_duration(settings.max_delay)}) ahead.",
    )
    schema.pop("$defs", None)  # UniqueBody: a component of its own (_unique_schema)
    # delay and run_at exclude each other.
    schema["not"] = {
        "properties": {"delay": {"type": "number"}, "run_at": {"type": "string"}},
        "required": ["delay", "run_at"],
    }
    return schema


def _type_schema(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task type definition and the backoff schemas it refers to."""
    schema = TaskTypeBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schema["title"] = "TaskTypeRequest"
    schema["properties"]["queue"] = nullable(
        {"type": "string", "enum": settings.queues},
        description="Default queue; default: 'default'.",
    )
    schema["properties"]["payload_schema"]["anyOf"][0] = {
        **ref("JsonObject"),
        "description": "A JSON Schema (draft 2020-12); strings may not contain NUL.",
    }
    duration = {
        "anyOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": DURATION_PATTERN},
        ],
        "description": "Seconds, or a duration such as 500ms, 5s, 2m, 1h, 30d.",
    }
    schema["properties"]["rate_limit"] = {
        "anyOf": [
            ref("LimitRequest"),
            {"type": "string", "pattern": ratelimits.LIMITER_NAME.pattern},
            {"type": "null"},
        ],
        "description": schema["properties"]["rate_limit"].get("description", ""),
    }
    backoffs = schema.pop("$defs", {})
    backoffs.pop("UniqueBody", None)  # a component of its own (_unique_schema)
    for backoff in backoffs.values():
        props = backoff["properties"]
        for name in ("delay", "base", "max"):
            if name in props:
                props[name] = {**duration, "default": props[name].get("default")}
                if props[name]["default"] is None:
                    del props[name]["default"]
        if "delays" in props:
            props["delays"]["items"] = duration
    backoffs["ConcurrencyBody"]["properties"]["key"]["anyOf"][0]["pattern"] = NO_NUL
    return schema, backoffs


_REASON = {
    "type": "object",
    "properties": {"reason": {"type": "string", "maxLength": 1000, "pattern": NO_NUL}},
    "additionalProperties": False,
}


_LIMIT = {
    "type": "object",
    "description": "A rate limit: `limit` starts per `per`, `burst` at once after an idle"
    " spell (default 1: evenly spaced), one bucket per value of payload field `key`.",
    "properties": {
        "limit": {"type": "integer", "minimum": 1, "maximum": ratelimits.MAX_LIMIT},
        "per": {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": ratelimits.MAX_PER},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": "Seconds, or a duration such as 500ms, 1s, 1m, 1h (at most 30 days).",
        },
        "burst": {"type": "integer", "minimum": 1, "default": 1},
        "key": {"type": ["string", "null"], "pattern": ratelimits.KEY_FIELD.pattern},
    },
    "required": ["limit", "per"],
    "additionalProperties": False,
}


def _schedule_schema(settings: Settings) -> dict[str, Any]:
    """The schedule definition of ``PUT /schedules/{name}``."""
    schema = ScheduleBody.model_json_schema()
    schema["title"] = "ScheduleRequest"
    props = schema["properties"]
    props["queue"] = nullable(
        {"type": "string", "enum": settings.queues}, description="Default: the type's queue."
    )
    props["type"] = {"type": "string", "pattern": TYPE_NAME.pattern}
    props["payload"] = {**ref("JsonObject"), "description": "Each fire's payload."}
    props["every"] = nullable(
        {
            "anyOf": [
                {"type": "number", "minimum": 1, "maximum": 366 * 86400},
                {"type": "string", "pattern": DURATION_PATTERN},
            ]
        },
        description="Instead of cron: seconds, or a duration such as 30s, 5m, 1h, 1d.",
    )
    return schema


def _unique_schema() -> dict[str, Any]:
    """``unique`` of an enqueue or a task type, with the key's and ``for``'s rules."""
    schema = UniqueBody.model_json_schema()
    props = schema["properties"]
    # Text not starting with '$' (a key), or a payload path.
    props["key"]["pattern"] = r"^([^$\x00][^\x00]*|\$(\.[A-Za-z0-9_-]{1,64}){0,16})$"
    props["for"] = nullable(
        {
            "anyOf": [
                {"type": "number", "minimum": 1, "maximum": MAX_FOR_SECONDS},
                {"type": "string", "pattern": DURATION_PATTERN},
            ]
        },
        description=props["for"]["description"],
    )
    return schema


def body_schemas(settings: Settings) -> dict[str, Any]:
    """The component schemas of request and answer bodies, with queue names and limits."""
    type_schema, backoffs = _type_schema(settings)
    return {
        "EnqueueRequest": _enqueue_schema(settings),
        "EnqueueBatchRequest": {
            "type": "object",
            "properties": {
                "tasks": {
                    "type": "array",
                    "items": ref("EnqueueRequest"),
                    "minItems": 1,
                    "maxItems": 1000,
                }
            },
            "required": ["tasks"],
            "additionalProperties": False,
        },
        "TaskTypeRequest": type_schema,
        "UniqueBody": _unique_schema(),
        "ScheduleRequest": _schedule_schema(settings),
        "LimitRequest": _LIMIT,
        "EnqueueAnswer": _ENQUEUE_ANSWER,
        "Task": _TASK,
        "JsonValue": _JSON_VALUE,
        "JsonObject": _JSON_OBJECT,
        "ReasonRequest": _REASON,
        "ReplayRequest": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "pattern": TYPE_NAME.pattern},
                "queue": {"type": "string", "enum": settings.queues},
                "ids": {
                    "type": "array",
                    "items": {"type": "string", "format": "uuid"},
                    "maxItems": 10000,
                },
            },
            "additionalProperties": False,
        },
        **backoffs,
    }
