"""Small helpers shared by several modules."""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from taskq.errors import FieldError

if TYPE_CHECKING:
    from pydantic import ValidationError

# What parse_duration accepts, for documents (the OpenAPI schema); parse_duration
# itself reads durations without one. Its only ambiguity, whether spaces before
# the end belong to a unit, costs a matcher linear time, never quadratic.
DURATION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?(\s*(ms|s|m|h|d))?\s*$"
MAX_DURATION_CHARS = 64
_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0))
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
# A JSON \u0000 escape (a NUL) in text written by a JSON encoder: its backslash is
# preceded by an even number of backslashes. The possessive (?:\\\\)*+ takes
# every pair of a run at once and never gives one back, and a run is only
# entered at its first backslash, so a search is linear in the text's length.
NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*+\\u0000")


def parse_duration(value: str | float | int) -> float:
    """Turn ``500ms``, ``5s``, ``2m``, ``1h``, ``30d`` or plain seconds into seconds.

    Raises:
        ValueError: for anything else, including negative and non-finite numbers.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    seconds = float(value) if isinstance(value, int | float) else _parse_duration_text(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def _parse_duration_text(value: str) -> float:
    bad = ValueError(f"not a duration: {preview(value)} (use e.g. 500ms, 5s, 2m, 1h, 30d)")
    text = value.strip()
    if len(text) > MAX_DURATION_CHARS:
        raise bad
    size = 1.0
    for unit, unit_size in _UNITS:  # "ms" before "s" and "m"
        if text.endswith(unit):
            text, size = text[: -len(unit)].rstrip(), unit_size
            break
    if not _NUMBER.fullmatch(text):
        raise bad
    return float(text) * size


def preview(value: str, limit: int = 40) -> str:
    """``repr(value)``, cut short: error messages stay small whatever the input."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"


def json_has_nul(json_text: str) -> bool:
    """Whether JSON text written by orjson holds a NUL, which Postgres cannot store."""
    return "\\u0000" in json_text and NUL_ESCAPE.search(json_text) is not None


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` that :func:`parse_duration` reads back."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``.

    Also for a malformed URL: everything between the first ``:`` after the
    scheme and the last ``@`` is masked, whatever a parser would make of it (a
    password with an unencoded ``/``, ``?`` or ``#``).
    """
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not separator or not at or not colon or not password:
        return url
    return f"{scheme}://{user}:***@{host}"


def redact(text: str, urls: list[str]) -> str:
    """``text`` with the password of each of ``urls`` (as written, and as a URL
    parser decodes it) replaced by ``***``."""
    for url in urls:
        userinfo = url.partition("://")[2].rpartition("@")[0]
        password = userinfo.partition(":")[2]
        for secret in {password, unquote(password)}:
            if secret:
                text = text.replace(secret, "***")
    return text


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (database names cannot be bind parameters)."""
    return '"' + name.replace('"', '""') + '"'


_UUID7_VERSION = 0x7 << 76
_UUID7_VARIANT = 0b10 << 62
_RAND_B = (1 << 62) - 1


def task_id() -> uuid.UUID:
    """A new task id: a UUID version 7 (RFC 9562), its first 48 bits the time in ms.

    Ids that grow with time go into the primary key's B-tree (and the events' index
    on the task id) near the ones before them, where random (version 4) ids touched
    a page of their own each: a full page image in the WAL for each after every
    checkpoint, and a split here and there. The insert takes less of the server's
    time and writes less WAL per task (figures: docs/benchmark.md).
    """
    rand = int.from_bytes(os.urandom(10))
    rand_a = (rand >> 62) & 0xFFF
    return uuid.UUID(
        int=(time.time_ns() // 1_000_000) << 80
        | _UUID7_VERSION
        | rand_a << 64
        | _UUID7_VARIANT
        | rand & _RAND_B
    )


def integral(value: Any) -> Any:
    """A pydantic ``mode="before"`` validator: JSON has one number type, so 3.0 is the
    integer 3, as JSON Schema's "integer" says."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Tags pydantic puts in an error's location for the member of a union (or of a
# discriminated one) that was tried: not part of the field's path.
_UNION_TAGS = frozenset({"list", "fixed", "exponential", "float", "str"})


def field_errors(exc: ValidationError, prefix: str) -> list[FieldError]:
    """A pydantic error as taskq's, one per field (``tasks[3].unique.for``) under
    ``prefix``: the message of the first error of a field that failed every member of
    a union."""
    out: dict[str, FieldError] = {}
    for error in exc.errors():
        path = prefix
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in _UNION_TAGS:
                path += f".{part}" if path else str(part)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required"
        out.setdefault(path or "body", FieldError(path or "body", message))
    return list(out.values())
