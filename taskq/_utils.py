"""Small helpers shared by several modules."""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit, urlunsplit

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """Turn ``500ms``, ``5s``, ``2m``, ``1h``, ``30d`` or plain seconds into seconds.

    Raises:
        ValueError: for anything else, including negative and non-finite numbers.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = DURATION.match(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 5s, 2m, 1h, 30d)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` that :func:`parse_duration` reads back."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (database names cannot be bind parameters)."""
    return '"' + name.replace('"', '""') + '"'
