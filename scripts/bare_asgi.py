"""The bare-ASGI reference of `scripts/bench`: taskq's HTTP stack without taskq.

uvicorn as `taskq api` runs it (the same event loop, HTTP parser, garbage
collector settings and uvicorn options), serving a raw ASGI app that reads the
request body, parses it with orjson as taskq's API does, and answers 201 with a
body of the shape and size of taskq's (id, type, queue, status, attempts,
max_attempts, run_at, created_at). What `POST /enqueue` costs beyond this app
is taskq's own.

    .venv/bin/python scripts/bare_asgi.py --port 18940
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn

# taskq's own loop factory (uvloop) and GC settings, imported rather than copied
# so that the reference follows any change to how `taskq api` runs.
from taskq.cli import _loop_factory, _tune_gc

Message = MutableMapping[str, Any]
HEADERS = [(b"content-type", b"application/json")]


async def app(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Any]
) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        data = orjson.loads(body)
        task_type = data["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        await send({"type": "http.response.start", "status": 400, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    now = datetime.now(UTC)
    answer = orjson.dumps(
        {
            "id": uuid.uuid4(),
            "type": task_type,
            "queue": "default",
            "status": "ENQUEUED",
            "attempts": 0,
            "max_attempts": 5,
            "run_at": now,
            "created_at": now,
        }
    )
    length = (b"content-length", str(len(answer)).encode())
    await send({"type": "http.response.start", "status": 201, "headers": [*HEADERS, length]})
    await send({"type": "http.response.body", "body": answer})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The options of taskq.cli.cmd_api; `loop` and `http` stay "auto" there too
    # (the loop is the one the runner below made; httptools parses HTTP).
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        access_log=False,
        log_config=None,
        lifespan="off",  # the app has no start-up; taskq's does not run per request either
    )
    _tune_gc()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
