"""The API's guards against hostile requests: signed cursors, JSON-only state changes,
the Host check, bounded listings, streams and caches, and a health check that names
the failing part without the driver's words."""

from __future__ import annotations

import asyncio
import base64
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import JSON, assert_problem, declare_topology, put_type, running_api
from tests.support.proxy import proxied

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


async def test_listings_carry_payloads_and_results_only_when_asked(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    task = await enqueue(api)
    await db.execute(
        "UPDATE tasks SET status = 'FAILED', finished_at = now(), result = '{\"r\": 2}'"
        " WHERE id = $1",
        uuid.UUID(task),
    )
    for path in ("/tasks", "/dlq"):
        [plain] = (await api.get(path)).json()["tasks"]
        assert plain["id"] == task and "payload" not in plain and "result" not in plain
        [full] = (await api.get(path, params={"include": "payload,result"})).json()["tasks"]
        assert (full["payload"], full["result"]) == ({"n": 1}, {"r": 2})
        [some] = (await api.get(path, params=[("include", "result")])).json()["tasks"]
        assert "payload" not in some and some["result"] == {"r": 2}
        assert_problem(await api.get(path, params={"include": "secrets"}), 400, "include")
    # The one task's own route has it all.
    assert (await api.get(f"/tasks/{task}")).json()["payload"] == {"n": 1}
    # With bodies a page holds at most 50 tasks; the cursor leads on.
    await api.post("/enqueue/batch", json={"tasks": [{"type": "g.v1", "payload": {}}] * 60})
    page = (await api.get("/tasks", params={"include": "payload", "limit": 500})).json()
    assert len(page["tasks"]) == 50 and page["next_cursor"]


async def test_broker_depths_and_the_unpublished_count_are_read_once_for_many_scrapes(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = api.app.state.monitor  # type: ignore[attr-defined]
    calls = {"depths": 0, "unpublished": 0}
    depths, unpublished = monitor.reader.depths, monitor.store.unpublished_count

    async def counted_depths(queues: list[str]) -> Any:
        calls["depths"] += 1
        return await depths(queues)

    async def counted_unpublished() -> int:
        calls["unpublished"] += 1
        return int(await unpublished())

    monkeypatch.setattr(monitor.reader, "depths", counted_depths)
    monkeypatch.setattr(monitor.store, "unpublished_count", counted_unpublished)
    answers = await asyncio.gather(
        *(api.get(path) for path in ["/metrics", "/stats", "/dlq"] * 10 + ["/metrics"] * 20)
    )
    assert {r.status_code for r in answers} == {200}
    assert "taskq_queue_messages" in answers[0].text
    # One read each, or two if the scrapes straddled the end of DEPTHS_MAX_AGE.
    assert 1 <= calls["depths"] <= 2 and 1 <= calls["unpublished"] <= 2, calls


async def test_the_type_cache_refreshes_single_flight(settings: Settings) -> None:
    from taskq.enqueue.task_types import TypeCache
    from taskq.store import Store

    store = await Store.connect(settings.database_url)
    reads = 0
    task_types = store.task_types

    async def counted() -> Any:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)
        return await task_types()

    store.task_types = counted  # type: ignore[method-assign]
    try:
        cache = TypeCache(store)
        await cache.get("warm.up")
        await asyncio.sleep(0.1)  # older than a miss may be; within the TTL
        reads = 0
        # A flood of unknown names: one read at a time, not one each.
        found = await asyncio.gather(*(cache.get(f"nope.{n}") for n in range(300)))
        assert found == [None] * 300 and reads == 1, reads
        # A name just found missing is answered from memory for a while.
        await asyncio.sleep(0.1)
        await asyncio.gather(*(cache.get("nope.7") for _ in range(50)))
        assert reads == 1, reads
    finally:
        await store.close()


async def test_the_registry_is_capped(
    settings: Settings, db: asyncpg.Connection, tmp_path: Any
) -> None:
    from tests.support.services import subprocess_env

    capped = settings.model_copy(update={"max_task_types": 3})
    await declare_topology(capped)
    async with running_api(capped, relay=False) as api:
        for name in ("a.v1", "b.v1", "c.v1"):
            assert (await api.put(f"/types/{name}", json={})).status_code == 201
        body = assert_problem(await api.put("/types/d.v1", json={}), 409, "name")
        assert "TASKQ_MAX_TASK_TYPES" in body["detail"]
        # Replacing a type is no growth.
        assert (await api.put("/types/a.v1", json={"max_attempts": 2})).status_code == 200
    assert await db.fetchval("SELECT count(*) FROM task_type") == 3
    # A worker whose handlers would add types past the cap does not start, and says why.
    env = subprocess_env(settings, TASKQ_MAX_TASK_TYPES="3")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taskq", "worker", "taskq.demo", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:  # it started after all: stop it
            process.kill()
            await process.wait()
    assert process.returncode == 1 and b"TASKQ_MAX_TASK_TYPES" in err, err
    assert await db.fetchval("SELECT count(*) FROM task_type") == 3


async def test_health_names_the_failing_part_without_the_drivers_words(
    settings: Settings,
) -> None:
    await declare_topology(settings)
    proxy, through = await proxied(settings, "database")
    try:
        async with running_api(through, relay=False) as api:
            assert (await api.get("/healthz")).json()["database"] == "ok"
            await proxy.cut()
            for _ in range(100):
                response = await api.get("/healthz")
                if response.status_code == 503:
                    break
                await asyncio.sleep(0.1)
            body = assert_problem(response, 503)
            assert body["detail"] == "failing: database"
            # taskq's words only: the driver's name hosts, ports and internals.
            assert body["database"] in (
                "down: no answer within 2s",
                "down: the database refused or dropped the connection",
            ), body
            unavailable = assert_problem(await api.get("/types"), 503)
            assert unavailable["detail"] == "the database did not answer; try again"
    finally:
        await proxy.cut()
