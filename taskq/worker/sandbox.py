"""Calling user code: whatever a handler does, its call ends in one :data:`Ending`.

A handler may return anything, raise anything (``SystemExit`` from ``sys.exit()``,
``KeyboardInterrupt``, a ``CancelledError`` of its own, ``GeneratorExit``, any
other ``BaseException``), or return what cannot be stored. The calls here catch
all of it and hand the worker a value, never an exception: nothing a handler
raises reaches the event loop (where ``SystemExit`` would stop the worker) or a
thread's excepthook. The result becomes JSON text where the handler ran, so a
sync handler's huge result costs its thread, not the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson

from taskq._utils import json_has_nul
from taskq.handlers import Context

MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Returned:
    """The handler returned; ``json`` is its result as JSON text that Postgres accepts."""

    json: str


@dataclass(frozen=True, slots=True)
class Raised:
    """The handler raised ``error``: any exception, ``BaseException`` included."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Refused:
    """The call ended in a way no other attempt can mend (a result that cannot be
    stored, a handler declared wrong): the task fails for good, ``reason`` says why."""

    reason: str


Ending: TypeAlias = Returned | Raised | Refused
Function: TypeAlias = Callable[[dict[str, Any], Context], Any]


async def call_async(
    function: Function, payload: dict[str, Any], ctx: Context, limit: int
) -> Ending:
    """Await an ``async def`` handler; ``limit`` is the largest result in bytes of JSON."""
    try:
        result = await function(payload, ctx)
    except BaseException as exc:  # whatever the handler raises ends its attempt, no more
        return Raised(exc)
    return result_json(result, limit)


def call_sync(function: Function, payload: dict[str, Any], ctx: Context, limit: int) -> Ending:
    """Call a plain ``def`` handler (in a thread of its own); as :func:`call_async`."""
    try:
        result = function(payload, ctx)
    except BaseException as exc:  # whatever the handler raises ends its attempt, no more
        return Raised(exc)
    if inspect.isawaitable(result):
        # Nobody will await it; closing a coroutine spares the "never awaited" warning.
        if inspect.iscoroutine(result):
            result.close()
        return Refused(
            f"HandlerError: the handler of {ctx.type!r} is a plain function but returned"
            f" {type(result).__name__}, an awaitable: declare it with async def"
        )
    return result_json(result, limit)


def result_json(result: object, limit: int) -> Returned | Refused:
    """The result as JSON text of at most ``limit`` bytes that Postgres' jsonb accepts."""
    try:
        data = orjson.dumps(result)
    except Exception as exc:  # orjson's TypeError, or whatever a result's class raises
        return Refused(clean(f"InvalidResult: the result is not JSON: {exc}"))
    if len(data) > limit:
        return Refused(
            f"InvalidResult: the result is {len(data):,} bytes of JSON,"
            f" more than TASKQ_MAX_RESULT_BYTES ({limit:,})"
        )
    text = data.decode()
    if json_has_nul(text):
        return Refused(
            "InvalidResult: the result contains a NUL character (\\u0000),"
            " which Postgres cannot store"
        )
    return Returned(text)


def error_text(exc: BaseException, message: str | None = None) -> str:
    """``Class: message`` for ``last_error``: what a ``BaseException`` that is not an
    ``Exception`` meant, and storable (see :func:`clean`)."""
    if message is None:
        message = str(exc)
        if isinstance(exc, SystemExit):
            message = f"the handler called sys.exit({'' if exc.code is None else repr(exc.code)})"
        elif isinstance(exc, asyncio.CancelledError):
            message = "the handler raised it itself; taskq did not cancel it" + (
                f" ({message})" if message else ""
            )
        elif not isinstance(exc, Exception):
            message = (
                f"{message} (raised inside the handler)" if message else "raised inside the handler"
            )
    return clean(f"{type(exc).__name__}: {message}")


def clean(text: str) -> str:
    """``text`` storable in a text column and an AMQP header: no NUL, valid UTF-8, bounded."""
    text = text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text
