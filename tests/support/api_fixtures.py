"""Shared helpers for tests that drive the HTTP API in-process (real Postgres and RabbitMQ)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx

from taskq.amqp import broker
from taskq.settings import Settings
from taskq.web.api import create_app


async def declare_topology(settings: Settings) -> None:
    connection = await broker.connect(settings.amqp_urls, name="test-declare", robust=False)
    try:
        await broker.declare(connection, settings.topology())
    finally:
        await connection.close()


@asynccontextmanager
async def running_api(
    settings: Settings, *, relay: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, behind an httpx client."""
    app = create_app(settings, relay=relay)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=30
        ) as client,
    ):
        client.app = app  # type: ignore[attr-defined]
        yield client


# Every request that changes state says its body is JSON, even an empty body.
JSON = {"content-type": "application/json"}


async def put_type(client: httpx.AsyncClient, name: str, **definition: Any) -> None:
    response = await client.put(f"/types/{name}", json=definition)
    assert response.status_code in (200, 201), response.text


async def drain(settings: Settings, queue: str, *, expect: int, timeout: float = 10.0) -> list[Any]:
    """Consume ``expect`` messages from work queue ``queue`` (fewer if the timeout passes)."""
    import asyncio

    connection = await aio_pika.connect(settings.amqp_url)
    messages: list[Any] = []
    try:
        channel = await connection.channel()
        q = await channel.get_queue(settings.topology().names.queue(queue), ensure=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(messages) < expect and loop.time() < deadline:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                messages.append(message)
        # Anything beyond what was expected would be a duplicate: look briefly.
        await asyncio.sleep(0.3)
        while (extra := await q.get(no_ack=True, fail=False)) is not None:
            messages.append(extra)
    finally:
        await connection.close()
    return messages


def assert_problem(
    response: httpx.Response, status: int, field: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    return body
