"""Unique tasks and debounce: the ``unique`` of a task type or of one enqueue, and the key
it gives a task. Pure: the database arbitrates (see sql/migrations/0011_unique.sql).

``unique={"key": ..., "while": ..., "for": ..., "on_conflict": ...}``:

- ``key``: ``$`` (the whole payload, the default), a payload path ``$.a.b`` (the value
  of that field), or any other text: the key itself. Keys are per task type.
- ``while``: the states in which a task holds its key: ``queued`` (ENQUEUED and not
  yet started), ``active`` (ENQUEUED or RUNNING, the default) or ``until_finished``
  (also SUCCEEDED: only FAILED and CANCELLED free it). WAITING (a paused type, a
  concurrency limit) holds it as ENQUEUED does (migration 0015).
- ``for``: a bound in time (seconds, or ``10m``): a task holds its key at most that
  long after its enqueue. None: as long as its state holds it.
- ``on_conflict``: ``keep`` (the default: the duplicate enqueue creates nothing and
  answers with the holder) or ``replace`` (debounce: the holder, while ENQUEUED or
  WAITING and not yet started, takes the duplicate's payload and run_at).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskq._utils import field_errors, parse_duration
from taskq.errors import FieldError, InvalidRequest

WHILE = ("queued", "active", "until_finished")
MAX_KEY_CHARS = 255
# A payload value whose JSON text is longer is keyed by its SHA-256.
MAX_VALUE_CHARS = 128
MAX_FOR_SECONDS = 366 * 86400.0
_PATH = re.compile(r"\$(\.[A-Za-z0-9_-]{1,64}){0,16}")
_MISSING = object()


class UniqueBody(BaseModel):
    """``unique`` in ``POST /enqueue`` and ``PUT /types/{name}``."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    key: str = Field(
        "$",
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="'$': the whole payload; '$.a.b': that payload field's value;"
        " other text: the key itself. Per task type.",
    )
    while_: Literal["queued", "active", "until_finished"] = Field(
        "active",
        alias="while",
        description="queued: ENQUEUED or WAITING, not yet started; active: also RUNNING;"
        " until_finished: also SUCCEEDED (FAILED and CANCELLED free the key).",
    )
    for_: float | str | None = Field(
        None,
        alias="for",
        description="Hold the key at most this long after the enqueue (seconds, or 10m);"
        " null: while the state holds it.",
    )
    on_conflict: Literal["keep", "replace"] = Field(
        "keep",
        description="keep: a duplicate creates nothing and answers with the holder;"
        " replace (debounce): a holder not yet started takes its payload and run_at.",
    )


@dataclass(frozen=True, slots=True)
class Unique:
    """A checked ``unique``: see the module."""

    key: str = "$"
    while_: str = "active"
    for_seconds: float | None = None
    replace: bool = False

    def to_json(self) -> dict[str, Any]:
        """As the API shows it (and the registry stores it)."""
        return {
            "key": self.key,
            "while": self.while_,
            "for": self.for_seconds,
            "on_conflict": "replace" if self.replace else "keep",
        }


def parse(data: Any, field: str = "unique") -> Unique:
    """Check a ``unique`` object (a dict, as JSON gives it); raises InvalidRequest
    naming ``field.<part>``."""
    if isinstance(data, Unique):
        return data
    if not isinstance(data, dict):
        raise InvalidRequest([FieldError(field, "must be a JSON object")])
    try:
        body = UniqueBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc, field)) from None
    return from_body(body, field)


def from_body(body: UniqueBody, field: str) -> Unique:
    """The checks a :class:`UniqueBody` needs beyond its model (the key, ``for``)."""
    errors = []
    if "\x00" in body.key:
        errors.append(FieldError(field + ".key", "may not contain NUL characters"))
    elif body.key.startswith("$") and not _PATH.fullmatch(body.key):
        message = "a payload path is '$' or '$.field.field' (letters, digits, '_', '-')"
        errors.append(FieldError(field + ".key", message))
    seconds = None
    if body.for_ is not None:
        try:
            seconds = parse_duration(body.for_)
        except ValueError as exc:
            errors.append(FieldError(field + ".for", str(exc)))
        else:
            if not 1 <= seconds <= MAX_FOR_SECONDS:
                errors.append(FieldError(field + ".for", "from 1 second to 366 days"))
    if errors:
        raise InvalidRequest(errors)
    return Unique(body.key, body.while_, seconds, body.on_conflict == "replace")


def task_key(unique: Unique, type_name: str, payload: dict[str, Any], field: str) -> str:
    """The key a task of ``type_name`` with ``payload`` holds: ``<type>/<key>``.

    A payload path gives ``<type>/<path>=<the value's JSON>`` (the value's SHA-256
    when its JSON is longer than :data:`MAX_VALUE_CHARS`), so that it never equals a
    literal key (which cannot start with ``$``).

    Raises:
        InvalidRequest: naming ``field``: the payload has no value at the path.
    """
    if not unique.key.startswith("$"):
        return f"{type_name}/{unique.key}"
    value: Any = payload
    for name in unique.key.split(".")[1:]:
        value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            message = f"the payload has no value at {unique.key} (the unique key)"
            raise InvalidRequest([FieldError(field, message)])
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 3.0 is 3
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    if len(text) > MAX_VALUE_CHARS:
        text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return f"{type_name}/{unique.key}={text}"
