"""Small helpers shared by several modules."""

from __future__ import annotations

import math
import re
from urllib.parse import unquote

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
