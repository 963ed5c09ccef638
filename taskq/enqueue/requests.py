"""Enqueue requests from Python calls: the body ``POST /enqueue`` takes, built from a task
type (a name or a :class:`~taskq.definitions.TaskDefinition`), a payload (a dict, or a
model instance serialised through pydantic) and the call's options."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from taskq.definitions import TaskDefinition
from taskq.enqueue import validation
from taskq.errors import FieldError, InvalidRequest
from taskq.payloads import to_payload

_MANY_OPTIONS = (
    "payloads",
    "queue",
    "max_attempts",
    "idempotency_keys",
    "delay",
    "run_at",
    "timeout",
    "unique",
)


def bodies(
    items: TaskDefinition[Any, Any] | str | Sequence[Any],
    payloads: Iterable[Any] | None,
    queue: str | None,
    max_attempts: int | None,
    idempotency_keys: Sequence[str | None] | None,
    delay: float | None,
    run_at: datetime | str | None,
    timeout: float | None,
    unique: dict[str, Any] | None = None,
) -> Sequence[Any]:
    """The request bodies of ``enqueue_many``: one per payload of a type, or ``items``
    themselves when they are bodies already (which take no payloads and no options).

    Raises:
        InvalidRequest: naming ``payloads`` (missing with a type, or given with
            bodies), an option given with bodies, ``idempotency_keys`` (not one
            per payload) or ``tasks[i].payload`` (a model instance that does not
            serialise).
    """
    if not isinstance(items, TaskDefinition | str):
        options = (payloads, queue, max_attempts, idempotency_keys, delay, run_at, timeout, unique)
        given = dict(zip(_MANY_OPTIONS, options, strict=True))
        misplaced = [name for name, value in given.items() if value is not None]
        if misplaced:
            message = "given with request bodies: set it in each body, or pass a type"
            raise InvalidRequest([FieldError(name, message) for name in misplaced])
        return items
    if payloads is None:
        raise InvalidRequest([FieldError("payloads", "required with a task type")])
    payloads = list(payloads)
    if idempotency_keys is not None and len(idempotency_keys) != len(payloads):
        message = f"one key (or None) per payload: {len(idempotency_keys)} for {len(payloads)}"
        raise InvalidRequest([FieldError("idempotency_keys", message)])
    keys = idempotency_keys or [None] * len(payloads)
    found, errors = [], []
    for index, (payload, key) in enumerate(zip(payloads, keys, strict=True)):
        try:
            found.append(
                body(items, payload, queue, max_attempts, key, delay, run_at, timeout, unique)
            )
        except InvalidRequest as exc:
            fields = [FieldError(f"tasks[{index}].{e.field}", e.message) for e in exc.errors]
            errors.append(InvalidRequest(fields))
    validation.raise_all(errors)
    return found


def body(
    task: TaskDefinition[Any, Any] | str,
    payload: Any,
    queue: str | None,
    max_attempts: int | None,
    idempotency_key: str | None,
    delay: float | None,
    run_at: datetime | str | None,
    timeout: float | None,
    unique: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The request body of one enqueue (what ``POST /enqueue`` takes).

    Raises:
        InvalidRequest: naming ``payload``: a model instance that does not serialise.
    """
    if isinstance(task, TaskDefinition):
        data: dict[str, Any] = {"type": task.name, "payload": task.to_payload(payload)}
    else:
        data = {"type": task, "payload": to_payload(payload)}
    for name, value in (
        ("queue", queue),
        ("max_attempts", max_attempts),
        ("idempotency_key", idempotency_key),
        ("delay", delay),
        ("timeout", timeout),
        ("unique", unique),
    ):
        if value is not None:
            data[name] = value
    if run_at is not None:
        data["run_at"] = run_at.isoformat() if isinstance(run_at, datetime) else run_at
    return data
