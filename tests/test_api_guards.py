"""The API's guards against hostile requests: signed cursors, JSON-only state changes,
the Host check, bounded listings, streams and caches, and a health check that names
the failing part without the driver's words."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from taskq.settings import Settings

from .api_fixtures import assert_problem, declare_topology, put_type, running_api

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings, relay=False) as client:
        await put_type(client, "g.v1")
        yield client


async def enqueue(api: httpx.AsyncClient, **fields: Any) -> str:
    response = await api.post("/enqueue", json={"type": "g.v1", "payload": {"n": 1}, **fields})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def forged(*parts: Any) -> str:
    """A cursor in the unsigned format taskq used to hand out."""
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


async def test_cursors_are_signed_and_replicas_share_them(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    ids = [await enqueue(api) for _ in range(3)]
    first = (await api.get("/tasks", params={"limit": 2})).json()
    cursor = first["next_cursor"]
    second = await api.get("/tasks", params={"limit": 2, "cursor": cursor})
    assert [t["id"] for t in first["tasks"] + second.json()["tasks"]] == ids[::-1]

    body, _, tag = cursor.partition(".")
    flipped = body[:-1] + ("A" if body[-1] != "A" else "B")
    for bad in [
        forged("0001-01-01T00:00:00+14:00", str(uuid.uuid4())),  # a 500 before cursors were signed
        forged("2030-01-01T00:00:00+00:00", str(uuid.uuid4())),
        f"{flipped}.{tag}",
        f"{body}.{tag[:-2]}",
        body,
        f"{body}.{tag}.x",
        "",
        "caf\u00e9." + tag,
        cursor + "A" * 60_000,
    ]:
        assert_problem(await api.get("/tasks", params={"cursor": bad}), 400, "cursor")
    # A cursor of one listing is not one of another.
    assert_problem(await api.get("/dlq", params={"cursor": cursor}), 400, "cursor")

    # Another replica (same database and namespace) reads this one's cursors ...
    async with running_api(settings, relay=False) as replica:
        again = await replica.get("/tasks", params={"limit": 2, "cursor": cursor})
        assert again.json()["tasks"] == second.json()["tasks"]
    # ... but a deployment with its own secret does not; replicas sharing the
    # secret do, whatever URL they reach the database by.
    secret = settings.model_copy(update={"cursor_secret": "s3cret"})
    async with running_api(secret, relay=False) as other:
        assert_problem(await other.get("/tasks", params={"cursor": cursor}), 400, "cursor")
        page = (await other.get("/tasks", params={"limit": 2})).json()
    alias = secret.database_url.replace("127.0.0.1", "localhost")
    async with running_api(secret.model_copy(update={"database_url": alias}), relay=False) as peer:
        response = await peer.get("/tasks", params={"limit": 2, "cursor": page["next_cursor"]})
        assert response.status_code == 200, response.text
