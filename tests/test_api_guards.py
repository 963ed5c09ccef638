"""The API's guards against hostile requests: signed cursors, JSON-only state changes,
the Host check, bounded listings, streams and caches, and a health check that names
the failing part without the driver's words."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from taskq.settings import Settings

from .api_fixtures import JSON, assert_problem, declare_topology, put_type, running_api

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


async def test_every_state_change_needs_a_json_content_type(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    failed = await enqueue(api)
    await db.execute(
        "UPDATE tasks SET status = 'FAILED', finished_at = now() WHERE id = $1", uuid.UUID(failed)
    )
    waiting = await enqueue(api)
    changes = [
        ("POST", f"/tasks/{waiting}/cancel"),
        ("POST", f"/tasks/{failed}/retry"),
        ("POST", "/dlq/replay"),
        ("DELETE", "/queues/default?confirm=default"),
        ("PUT", "/types/g.v2"),
        ("POST", "/enqueue"),
        ("POST", "/enqueue/batch"),
    ]
    # What a page on another site can send without the browser asking first.
    cross_site: list[dict[str, Any]] = [
        {},
        {"content": b'{"type": "g.v1"}', "headers": {"content-type": "text/plain"}},
        {"data": {"reason": "x"}},
        {"files": {"reason": (None, "x")}},
    ]
    before = await db.fetch("SELECT id, status, updated_at FROM tasks ORDER BY id")
    for method, path in changes:
        for request in cross_site:
            response = await api.request(method, path, **request)
            assert_problem(response, 415, "content-type")
    assert await db.fetch("SELECT id, status, updated_at FROM tasks ORDER BY id") == before
    assert (await api.get("/types/g.v2")).status_code == 404
    # With the type, an empty body is fine where a body is optional.
    for method, path in changes[:4]:
        response = await api.request(method, path, headers=JSON)
        assert response.status_code in (200, 202), (path, response.text)


async def test_the_host_header_is_checked(settings: Settings) -> None:
    async def status(config: Settings, host: str, path: str = "/healthz") -> int:
        async with running_api(config, relay=False) as client:
            response = await client.get(path, headers={"host": host})
            if response.status_code == 400:
                assert_problem(response, 400, "host")
            return response.status_code

    await declare_topology(settings)
    allowed = ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "LOCALHOST."]
    refused = [
        "evil.example",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8000",
        "10.0.0.7:8000",  # an address the default bind (127.0.0.1) does not listen on
        "[::1",
        "localhost:80:80",
        "localhost:x",
        "h" * 10_000,
    ]
    async with running_api(settings, relay=False) as client:
        for host in allowed:
            assert (await client.get("/healthz", headers={"host": host})).status_code == 200, host
        for host in refused:
            response = await client.get("/healthz", headers={"host": host})
            assert_problem(response, 400, "host")
        # Before routing: the fast enqueue path and the dashboard's files too.
        body = {"type": "g.v1", "payload": {}}
        evil = {"host": "evil.example"}
        assert_problem(await client.post("/enqueue", json=body, headers=evil), 400, "host")
        assert_problem(await client.get("/ui/", headers=evil), 400, "host")

    # Listening on every address: any IP address is answered, names only if listed.
    wildcard = settings.model_copy(update={"http_host": "0.0.0.0"})
    assert await status(wildcard, "10.0.0.7:8000") == 200
    assert await status(wildcard, "[fe80::1]:8000") == 200
    assert await status(wildcard, "api:8000") == 400
    listed = settings.model_copy(update={"allowed_hosts": ["api", ".example.com"]})
    assert await status(listed, "api:8000") == 200
    assert await status(listed, "example.com") == 200
    assert await status(listed, "taskq.example.com") == 200
    assert await status(listed, "localhost") == 400  # a list replaces the default
    assert await status(listed, "badexample.com") == 400
    anything = settings.model_copy(update={"allowed_hosts": ["*"]})
    assert await status(anything, "evil.example") == 200
