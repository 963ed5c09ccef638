"""``POST /enqueue`` served straight from ASGI, without Starlette's request and response.

The API's hot route. It does what the route's endpoint (:func:`taskq.web.api.enqueue`
under :func:`taskq.web.http.endpoint`) does, with the same checks, errors and counts,
but reads the few headers it needs in one pass, reads the body from ``receive``
and writes its answer as two ASGI messages. Building and walking Starlette's
request, headers, state, body stream and response cost a taskq request most of
the time it spent between uvicorn and the client (figures: docs/benchmark.md).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from taskq.web.http import (
    SERVER_ERROR,
    authenticate,
    check_json,
    check_length,
    json_default,
    parse_json,
    problem_for,
    problem_response,
    too_large,
)

ROUTE = "enqueue"
_JSON = (b"content-type", b"application/json")
_REPLAYED = (b"idempotent-replayed", b"true")
# A duplicate of a unique task (taskq.web.api.UNIQUE_HEADER).
_KEPT = (b"unique-duplicate", b"kept")
_REPLACED = (b"unique-duplicate", b"replaced")


async def serve_enqueue(state: Any, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one ``POST /enqueue``; ``state`` is the application's state.

    Raises:
        Exception: what no problem answers (a bug), once a 500 problem is sent, for
            the server to log.
    """
    authorization = content_type = content_length = ""
    traceparent: str | None = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            content_length = value.decode("latin-1")
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"traceparent":
            # Two of them are invalid (W3C Trace Context): "" fails the check.
            traceparent = value.decode("latin-1") if traceparent is None else ""
    settings = state.settings
    try:
        if settings.api_keys:
            authenticate(authorization, settings.api_keys)
        check_json(content_type)
        limit = settings.max_payload_bytes
        check_length(content_length, limit)
        data = parse_json(await _body(receive, limit))
        result = await state.client.submit(data, traceparent=traceparent)
    except Exception as exc:
        problem = problem_for(exc, ROUTE)
        if problem is None:  # a bug: the same 500 as from Starlette's error middleware
            await problem_response(SERVER_ERROR)(scope, receive, send)
            raise
        response = problem_response(problem)
        await response(scope, receive, send)
        state.metrics.http_request(ROUTE, response.status_code)
        return
    body = orjson.dumps(result.task, default=json_default)
    length = (b"content-length", str(len(body)).encode())
    if result.created:
        status, headers = 201, [length, _JSON]
    elif result.duplicate:
        status, headers = 200, [_REPLACED if result.replaced else _KEPT, length, _JSON]
    else:
        status, headers = 200, [_REPLAYED, length, _JSON]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    state.metrics.http_request(ROUTE, status)


async def _body(receive: Receive, limit: int) -> bytes:
    """The request body, refused once it passes ``limit`` bytes."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the whole body in one message, as a rule
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks = bytearray()
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()  # as Starlette's request.stream() does
        chunks += message.get("body", b"")
        if len(chunks) > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            return bytes(chunks)
        message = await receive()
