"""Validation of enqueue requests and task type definitions: pure, shared by API and client.

Everything here either returns normalised values or raises :class:`InvalidRequest`
listing every field at fault, so that bad input changes nothing.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from taskq import ratelimits
from taskq._utils import field_errors, integral, json_has_nul, parse_duration, task_id
from taskq.enqueue import schemas

# Defined in taskq.errors; importing them from here keeps working.
from taskq.errors import FieldError as FieldError
from taskq.errors import InvalidRequest as InvalidRequest
from taskq.errors import SchemaProblem
from taskq.errors import TooLarge as TooLarge
from taskq.model import MAX_CONCURRENCY, Concurrency
from taskq.ratelimits import RateLimit
from taskq.settings import QUEUE_NAME, Settings
from taskq.store import NewTask, UniqueKey
from taskq.unique import Unique, UniqueBody, from_body, task_key

TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
MAX_TIMEOUT = 7 * 86400.0
MAX_BATCH = 1000
TOO_DEEP = "nested too deeply: keep it within 250 levels"


class EnqueueBody(BaseModel):
    """The body of ``POST /enqueue`` (and one item of ``POST /enqueue/batch``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str = Field(description="A registered, enabled task type.", max_length=200)
    payload: dict[str, Any] = Field(description="The handler's input: a JSON object.")
    queue: str | None = Field(None, description="One of TASKQ_QUEUES; default: the type's.")
    max_attempts: int | None = Field(None, ge=1, le=100, description="Default: the type's.")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, description="Same key and request: same task."
    )
    delay: float | None = Field(None, ge=0, description="Seconds before the task may start.")
    run_at: str | None = Field(None, description="RFC 3339 time before which it may not start.")
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT, description="Handler timeout (s).")
    unique: UniqueBody | None = Field(
        None, description="At most one task per key (see docs/producers.md); default: the type's."
    )

    _integral_attempts = field_validator("max_attempts", mode="before")(integral)


class EnqueueBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


class BackoffList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["list"]
    delays: list[float | str] = Field(min_length=1, max_length=100)


class BackoffFixed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["fixed"]
    delay: float | str


class BackoffExponential(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["exponential"]
    base: float | str = 1.0
    factor: float = Field(2.0, ge=1.0, le=100.0)
    max: float | str = 3600.0
    jitter: float = Field(0.1, ge=0.0, le=1.0)


class ConcurrencyBody(BaseModel):
    """A task type's concurrency limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    limit: int = Field(ge=1, le=MAX_CONCURRENCY, description="Tasks RUNNING at most per key.")
    key: str | None = Field(
        None, min_length=1, max_length=200, description="The payload field naming the key."
    )

    _integral_limit = field_validator("limit", mode="before")(integral)


class TaskTypeBody(BaseModel):
    """The body of ``PUT /types/{name}``: the whole definition (omitted fields take defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    queue: str | None = Field(None, description="Default queue; default: 'default'.")
    max_attempts: int = Field(5, ge=1, le=100)
    timeout: float = Field(300.0, gt=0, le=MAX_TIMEOUT, description="Handler timeout (s).")
    backoff: BackoffList | BackoffFixed | BackoffExponential | None = Field(
        None, discriminator="strategy", description="Default: the global backoff."
    )
    payload_schema: dict[str, Any] | None = Field(None, description="JSON Schema of payloads.")
    enabled: bool = True
    unique: UniqueBody | None = Field(
        None, description="Its tasks' uniqueness, for enqueues that give none."
    )
    concurrency: ConcurrencyBody | None = Field(
        None,
        description="At most `limit` tasks RUNNING per value of the payload field `key` "
        "(no key: for the whole type); the others wait. Default: no limit.",
    )
    rate_limit: Any = Field(  # checked by taskq.ratelimits, which names the field at fault
        None,
        description='At most so many starts per interval: {"limit": 100, "per": "1m"}'
        ' (optional "burst", and "key": a payload field, one limit per value), or the name'
        " of a limiter (PUT /limits/{name}); null: none. Omitted: unchanged.",
    )

    _integral_attempts = field_validator("max_attempts", mode="before")(integral)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def fingerprint(body: dict[str, Any]) -> str:
    """A stable hash of an enqueue request, without its idempotency key."""
    canonical = {k: v for k, v in body.items() if k != "idempotency_key" and v is not None}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


# Bounded before matching; [0-9] because \d would take any Unicode digit.
MAX_RFC3339_CHARS = 64
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> datetime:
    """A timezone-aware datetime from an RFC 3339 string. Raises ValueError."""
    if len(text) > MAX_RFC3339_CHARS or not _RFC3339.fullmatch(text):
        raise ValueError("not an RFC 3339 date-time with a timezone, e.g. 2030-01-01T12:00:00Z")
    text = text.replace("z", "Z").replace("t", "T")
    # RFC 3339 has leap seconds (23:59:60); Python does not: read one as the next second.
    leap = text[17:19] == "60"
    value = datetime.fromisoformat(text[:17] + "59" + text[19:] if leap else text)
    try:
        value += timedelta(seconds=1 if leap else 0)
        utc = value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00, before year 1 in UTC
        raise ValueError("out of range") from None
    if utc in (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)):
        raise ValueError("out of range")  # asyncpg would send -infinity or infinity
    return value


def _has_nul(text: str) -> bool:
    return "\x00" in text


def enqueue_task(
    data: Any, settings: Settings, *, prefix: str = "", traceparent: str | None = None
) -> tuple[NewTask, EnqueueBody]:
    """Validate one enqueue request into a :class:`NewTask` (with a fresh id).

    The task type itself is checked by the caller, which knows the registry;
    ``traceparent`` (checked by :mod:`taskq.tracing`) is stored with the task.

    Raises:
        InvalidRequest: naming every field at fault.
    """
    if not isinstance(data, dict):
        raise InvalidRequest([FieldError(prefix or "body", "must be a JSON object")])
    try:
        body = EnqueueBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc, prefix)) from None
    dot = prefix + "." if prefix else ""
    errors = []
    if not TYPE_NAME.fullmatch(body.type):
        errors.append(FieldError(dot + "type", "not a task type name"))
    if body.queue is not None and body.queue not in settings.queues:
        errors.append(FieldError(dot + "queue", f"unknown queue; one of {settings.queues}"))
    if body.idempotency_key is not None and _has_nul(body.idempotency_key):
        errors.append(FieldError(dot + "idempotency_key", "may not contain NUL characters"))
    if body.delay is not None and body.run_at is not None:
        errors.append(FieldError(dot + "run_at", "give delay or run_at, not both"))
    if body.unique is not None:
        try:
            from_body(body.unique, dot + "unique")
        except InvalidRequest as exc:
            errors += exc.errors
    run_at = None
    if body.delay is not None and (
        not math.isfinite(body.delay) or body.delay > settings.max_delay
    ):
        errors.append(FieldError(dot + "delay", f"at most {settings.max_delay:g} seconds"))
    if body.run_at is not None:
        try:
            run_at = parse_rfc3339(body.run_at)
        except ValueError as exc:
            errors.append(FieldError(dot + "run_at", str(exc)))
        else:
            if run_at - datetime.now(UTC) > timedelta(seconds=settings.max_delay):
                errors.append(
                    FieldError(dot + "run_at", f"at most {settings.max_delay:g} seconds ahead")
                )
    try:
        payload_bytes = orjson.dumps(body.payload)
        request_fingerprint = fingerprint(data) if body.idempotency_key is not None else None
    except orjson.JSONEncodeError:  # orjson writes at most 254 levels of nesting
        raise InvalidRequest([*errors, FieldError(dot + "payload", TOO_DEEP)]) from None
    if len(payload_bytes) > settings.max_payload_bytes:
        raise TooLarge(
            [FieldError(dot + "payload", f"larger than {settings.max_payload_bytes} bytes")]
        )
    payload_json = payload_bytes.decode()
    if json_has_nul(payload_json):
        errors.append(FieldError(dot + "payload", "strings may not contain NUL (\\u0000)"))
    if errors:
        raise InvalidRequest(errors)
    task = NewTask(
        id=task_id(),
        type=body.type,
        payload_json=payload_json,
        queue=body.queue,
        max_attempts=body.max_attempts,
        idempotency_key=body.idempotency_key,
        fingerprint=request_fingerprint,
        timeout=body.timeout,
        run_at=run_at,
        delay=body.delay,
        traceparent=traceparent,
    )
    return task, body


def with_unique(
    task: NewTask, body: EnqueueBody, type_unique: Unique | None, prefix: str
) -> NewTask:
    """``task`` with the key it holds, if its enqueue or its type asks for uniqueness
    (the enqueue's ``unique`` wins). ``prefix`` is the item's (``tasks[3].``).

    Raises:
        InvalidRequest: naming ``unique.key``: the payload has no value at its path.
    """
    if body.unique is None and type_unique is None:
        return task
    if body.unique is not None:
        spec = from_body(body.unique, prefix + "unique")
        field = prefix + "unique.key"
    else:
        assert type_unique is not None
        spec, field = type_unique, prefix + "payload"
    key = task_key(spec, task.type, body.payload, field)
    return replace(task, unique=UniqueKey(key, spec.while_, spec.for_seconds, spec.replace))


def batch_items(data: Any) -> list[Any]:
    """The items of a batch request ``{"tasks": [...]}`` (1 to 1000 of them)."""
    try:
        return EnqueueBatchBody.model_validate(data).tasks
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc, "")) from None


def raise_all(errors: list[InvalidRequest]) -> None:
    """Raise one error listing every field of ``errors`` (413 if any was too large)."""
    if errors:
        kind = TooLarge if any(isinstance(e, TooLarge) for e in errors) else InvalidRequest
        raise kind([field for error in errors for field in error.errors])


@dataclass(frozen=True)
class TaskTypeDefinition:
    name: str
    queue: str
    max_attempts: int
    timeout: float
    backoff_json: str | None
    payload_schema_json: str | None
    enabled: bool
    unique_json: str | None = None
    concurrency: Concurrency | None = None
    # Given: a 1-tuple of the type's own limit, a limiter's name or None; else None.
    rate_limit: tuple[RateLimit | str | None] | None = None


def task_type(name: str, data: Any, settings: Settings) -> TaskTypeDefinition:
    """Validate a task type definition (``PUT /types/{name}``).

    Checking a payload schema can be slow on purpose-built input: the API runs
    this through :class:`taskq.enqueue.offload.Offload`.
    """
    errors = []
    if not TYPE_NAME.fullmatch(name):
        errors.append(FieldError("name", "use 1-200 letters, digits, '.', '_', ':' or '-'"))
    if not isinstance(data, dict):
        raise InvalidRequest([*errors, FieldError("body", "must be a JSON object")])
    try:
        body = TaskTypeBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(errors + field_errors(exc, "")) from None
    queue = body.queue or settings.default_queue
    if not QUEUE_NAME.fullmatch(queue) or queue not in settings.queues:
        errors.append(FieldError("queue", f"unknown queue; one of {settings.queues}"))
    backoff = None
    if body.backoff is not None:
        try:
            backoff = _normalise_backoff(body.backoff.model_dump())
        except ValueError as exc:
            errors.append(FieldError("backoff", str(exc)))
    schema_json = None
    if body.payload_schema is not None:
        try:
            schemas.check_schema(body.payload_schema)
            schema_json = dumps(body.payload_schema)
        except SchemaProblem as exc:
            errors.append(FieldError("payload_schema", f"not a valid JSON Schema: {exc}"))
        except (RecursionError, orjson.JSONEncodeError):
            errors.append(FieldError("payload_schema", TOO_DEEP))
        if schema_json is not None and json_has_nul(schema_json):
            errors.append(FieldError("payload_schema", "strings may not contain NUL (\\u0000)"))
    unique_json = None
    if body.unique is not None:
        try:
            unique_json = dumps(from_body(body.unique, "unique").to_json())
        except InvalidRequest as exc:
            errors += exc.errors
    rate_limit: tuple[RateLimit | str | None] | None = None
    if "rate_limit" in body.model_fields_set:
        value = body.rate_limit
        if isinstance(value, str):
            if not ratelimits.LIMITER_NAME.match(value):
                errors.append(FieldError("rate_limit", "a limiter name: letters, digits, ._-"))
            rate_limit = (value,)
        elif value is None:
            rate_limit = (None,)
        else:
            found = ratelimits.problems(value, "rate_limit")
            errors += found
            if not found:
                rate_limit = (ratelimits.parse(value),)
    if errors:
        raise InvalidRequest(errors)
    limit = body.concurrency
    if limit is not None and limit.key is not None and "\x00" in limit.key:
        raise InvalidRequest([FieldError("concurrency.key", "may not contain NUL (\\u0000)")])
    return TaskTypeDefinition(
        name, queue, body.max_attempts, body.timeout, backoff, schema_json, body.enabled,
        unique_json,
        None if limit is None else Concurrency(limit.limit, limit.key, "api"),
        rate_limit,
    )  # fmt: skip


def _normalise_backoff(backoff: dict[str, Any]) -> str:
    """Durations given as ``"5s"`` strings become seconds."""
    for key in ("delay", "base", "max"):
        if key in backoff:
            backoff[key] = parse_duration(backoff[key])
    if "delays" in backoff:
        backoff["delays"] = [parse_duration(d) for d in backoff["delays"]]
    return dumps(backoff)
