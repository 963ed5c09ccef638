"""The enqueue API against the real Postgres and RabbitMQ: status codes, bodies, publishing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import httpx
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import (
    assert_problem,
    declare_topology,
    drain,
    put_type,
    running_api,
)
from tests.support.services import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings) as client:
        await put_type(client, "demo.echo")
        yield client


async def count_tasks(settings: Settings) -> int:
    connection = await asyncpg.connect(settings.database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM tasks"))
    finally:
        await connection.close()


async def test_enqueue_creates_publishes_and_reads_back(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {"n": 1}})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {
        "id", "type", "queue", "status", "attempts", "max_attempts", "run_at", "created_at",
    }  # fmt: skip
    assert (body["type"], body["queue"], body["status"], body["attempts"]) == (
        "demo.echo", "default", "ENQUEUED", 0,
    )  # fmt: skip
    assert body["max_attempts"] == 5

    [message] = await drain(settings, "default", expect=1)
    assert message.message_id == body["id"]
    assert message.type == "demo.echo"
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert json.loads(message.body) == {"id": body["id"], "type": "demo.echo", "attempt": 0}
    assert message.headers["x-taskq-queue"] == "default"

    task = (await api.get(f"/tasks/{body['id']}")).json()
    assert task["payload"] == {"n": 1} and task["status"] == "ENQUEUED"
    # Published markers are written in batches, a second after the confirm
    # (taskq.fleet.marker.MARK_DELAY) unless a worker's claim records the publish first.
    for _ in range(100):
        task = (await api.get(f"/tasks/{body['id']}")).json()
        if task["published_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert task["published_at"] is not None
    events = (await api.get(f"/tasks/{body['id']}/events")).json()["events"]
    assert [e["status"] for e in events] == ["ENQUEUED"]


async def test_defaults_come_from_the_task_type(api: httpx.AsyncClient) -> None:
    await put_type(api, "demo.slow", queue="low", max_attempts=7, timeout=60)
    body = (await api.post("/enqueue", json={"type": "demo.slow", "payload": {}})).json()
    assert (body["queue"], body["max_attempts"]) == ("low", 7)
    task = (await api.get(f"/tasks/{body['id']}")).json()
    assert task["timeout"] == 60
    explicit = {"type": "demo.slow", "payload": {}, "queue": "high", "max_attempts": 2}
    body = (await api.post("/enqueue", json=explicit)).json()
    assert (body["queue"], body["max_attempts"]) == ("high", 2)


async def test_idempotent_replay_returns_the_same_answer(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    request = {"type": "demo.echo", "payload": {"a": 1}, "idempotency_key": "order-1", "delay": 5}
    first = await api.post("/enqueue", json=request)
    assert first.status_code == 201
    second = await api.post("/enqueue", json=request)
    assert second.status_code == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert await count_tasks(settings) == 1

    other = await api.post("/enqueue", json={**request, "payload": {"a": 2}})
    body = assert_problem(other, 409, "idempotency_key")
    assert body["task_id"] == first.json()["id"]
    assert await count_tasks(settings) == 1


async def test_concurrent_identical_requests_create_one_task(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    request = {"type": "demo.echo", "payload": {"x": 1}, "idempotency_key": "same"}
    responses = await asyncio.gather(*(api.post("/enqueue", json=request) for _ in range(50)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 49 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count_tasks(settings) == 1
    assert len(await drain(settings, "default", expect=1)) == 1


async def test_delay_and_run_at(api: httpx.AsyncClient) -> None:
    body = (await api.post("/enqueue", json={**E, "delay": 60})).json()
    created = body["created_at"].replace("Z", "+00:00")
    gap = datetime.fromisoformat(body["run_at"]) - datetime.fromisoformat(created)
    assert 59.9 <= gap.total_seconds() <= 60.1
    when = "2099-01-01T00:00:00Z"
    response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {}, "run_at": when})
    assert_problem(response, 400, "run_at")  # beyond the maximum delay
    soon = datetime.now().astimezone().replace(microsecond=0).isoformat()
    response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {}, "run_at": soon})
    assert response.status_code == 201


E = {"type": "demo.echo", "payload": {}}
INVALID = [
    ({"payload": {}}, "type"),
    ({"type": "demo.echo"}, "payload"),
    ({"type": "demo.echo", "payload": [1]}, "payload"),
    ({"type": "demo.echo", "payload": "x"}, "payload"),
    ({**E, "colour": "red"}, "colour"),
    ({"type": "demo.nope", "payload": {}}, "type"),
    ({"type": "bad type!", "payload": {}}, "type"),
    ({"type": "'; DROP TABLE tasks; --", "payload": {}}, "type"),
    ({"type": 7, "payload": {}}, "type"),
    ({**E, "queue": "nope"}, "queue"),
    ({**E, "max_attempts": 0}, "max_attempts"),
    ({**E, "max_attempts": 101}, "max_attempts"),
    ({**E, "max_attempts": "3"}, "max_attempts"),
    ({**E, "max_attempts": True}, "max_attempts"),
    ({**E, "max_attempts": 10**30}, "max_attempts"),
    ({**E, "delay": -1}, "delay"),
    ({**E, "delay": 10**12}, "delay"),
    ({**E, "delay": "5"}, "delay"),
    ({**E, "delay": 1, "run_at": "2030-01-01T00:00:00Z"}, "run_at"),
    ({**E, "run_at": "tomorrow"}, "run_at"),
    ({**E, "run_at": "2030-01-01T00:00:00"}, "run_at"),
    ({**E, "timeout": 0}, "timeout"),
    ({**E, "timeout": -5}, "timeout"),
    ({**E, "idempotency_key": ""}, "idempotency_key"),
    ({**E, "idempotency_key": "k" * 256}, "idempotency_key"),
    ({**E, "idempotency_key": "a\u0000b"}, "idempotency_key"),
    ({**E, "idempotency_key": 12}, "idempotency_key"),
    ({"type": "demo.echo", "payload": {"s": "nul\u0000"}}, "payload"),
    ([1, 2], "body"),
    ("just a string", "body"),
]

MALFORMED = [
    b"{",
    b"\xff\xfe{}",
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a": NaN}',
    b"",
    b'{"a": 1e400}',
]


async def test_invalid_requests_are_400_and_change_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    for body, field in INVALID:
        response = await api.post("/enqueue", json=body)
        assert_problem(response, 400, field)
    json_type = {"content-type": "application/json"}
    for raw in MALFORMED:
        response = await api.post("/enqueue", content=raw, headers=json_type)
        assert_problem(response, 400, "body")
    assert await count_tasks(settings) == 0


async def test_disabled_type_is_refused(api: httpx.AsyncClient, settings: Settings) -> None:
    await put_type(api, "demo.off", enabled=False)
    response = await api.post("/enqueue", json={"type": "demo.off", "payload": {}})
    body = assert_problem(response, 400, "type")
    assert "disabled" in body["detail"]


async def test_payload_schema_names_the_path(api: httpx.AsyncClient, settings: Settings) -> None:
    schema = {
        "type": "object",
        "properties": {"to": {"type": "string", "format": "email"}, "n": {"type": "integer"}},
        "required": ["to"],
    }
    await put_type(api, "email.send.v1", payload_schema=schema)
    response = await api.post("/enqueue", json={"type": "email.send.v1", "payload": {"to": 5}})
    assert_problem(response, 400, "payload.to")
    response = await api.post("/enqueue", json={"type": "email.send.v1", "payload": {}})
    assert_problem(response, 400, "payload")
    assert await count_tasks(settings) == 0
    ok = await api.post("/enqueue", json={"type": "email.send.v1", "payload": {"to": "a@b.c"}})
    assert ok.status_code == 201


async def test_too_large_wrong_type_and_auth(
    postgres_server_url: str, database_url: str, amqp_url: str, namespace: str
) -> None:
    settings = make_settings(
        database_url=database_url,
        amqp_url=amqp_url,
        namespace=namespace,
        max_payload_bytes=1000,
        api_keys="k1,k2",
    )
    await declare_topology(settings)
    from tests.support.services import delete_namespace

    try:
        async with running_api(settings) as api:
            auth = {"authorization": "Bearer k2"}
            assert_problem(await api.put("/types/demo.echo", json={}), 401, "authorization")
            bad = {"authorization": "Bearer nope"}
            response = await api.put("/types/demo.echo", json={}, headers=bad)
            assert_problem(response, 401, "authorization")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert (await api.put("/types/demo.echo", json={}, headers=auth)).status_code == 201

            big = {"type": "demo.echo", "payload": {"s": "x" * 2000}}
            assert_problem(await api.post("/enqueue", json=big, headers=auth), 413)
            text = {**auth, "content-type": "text/plain"}
            response = await api.post("/enqueue", content=b"{}", headers=text)
            assert_problem(response, 415, "content-type")
            response = await api.post("/enqueue", content=b"{}", headers=auth)
            assert_problem(response, 415)
            batch = {"tasks": [{"type": "demo.echo", "payload": {"s": "x" * 1000}}]}
            assert_problem(await api.post("/enqueue/batch", json=batch, headers=auth), 413)
            # Health and metrics stay open for probes and Prometheus.
            assert (await api.get("/healthz")).status_code == 200
            assert (await api.get("/metrics")).status_code == 200
            assert_problem(await api.get(f"/tasks/{uuid.uuid4()}"), 401)
            assert await count_tasks(settings) == 0
    finally:
        await delete_namespace(settings)


async def test_batch_is_all_or_nothing(api: httpx.AsyncClient, settings: Settings) -> None:
    tasks = [{"type": "demo.echo", "payload": {"i": i}} for i in range(300)]
    response = await api.post("/enqueue/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.text
    assert len(response.json()["tasks"]) == 300
    assert len(await drain(settings, "default", expect=300)) == 300
    assert await count_tasks(settings) == 300

    broken = [*tasks[:3], {"type": "demo.echo", "payload": 5}, {"type": "x", "payload": {}}]
    body = assert_problem(await api.post("/enqueue/batch", json={"tasks": broken}), 400)
    assert [e["field"] for e in body["errors"]] == ["tasks[3].payload", "tasks[4].type"]
    too_many = {"tasks": [{"type": "demo.echo", "payload": {}}] * 1001}
    assert_problem(await api.post("/enqueue/batch", json=too_many), 400, "tasks")
    assert_problem(await api.post("/enqueue/batch", json={"tasks": []}), 400, "tasks")
    assert_problem(await api.post("/enqueue/batch", json={"tasks": tasks, "x": 1}), 400, "x")
    assert await count_tasks(settings) == 300


async def test_batch_replays_and_conflicts(api: httpx.AsyncClient, settings: Settings) -> None:
    keyed = [{**E, "payload": {"i": i}, "idempotency_key": f"k{i}"} for i in range(5)]
    first = await api.post("/enqueue/batch", json={"tasks": keyed})
    assert first.status_code == 201
    again = await api.post("/enqueue/batch", json={"tasks": keyed})
    assert again.status_code == 200
    assert [t["id"] for t in again.json()["tasks"]] == [t["id"] for t in first.json()["tasks"]]
    assert all(t["replayed"] for t in again.json()["tasks"])

    fresh = {"type": "demo.echo", "payload": {}, "idempotency_key": "new"}
    clash = {**keyed[2], "payload": {"other": True}}
    response = await api.post("/enqueue/batch", json={"tasks": [fresh, clash]})
    assert_problem(response, 409, "tasks[1].idempotency_key")
    assert await count_tasks(settings) == 5  # "new" was rolled back with the batch


async def test_reading_unknown_and_malformed_ids_is_404(api: httpx.AsyncClient) -> None:
    unknown = uuid.uuid4()
    for path in (
        f"/tasks/{unknown}",
        "/tasks/not-a-uuid",
        "/tasks/%00",
        f"/tasks/{unknown}/events",
    ):
        assert_problem(await api.get(path), 404)
    assert_problem(await api.get("/types/nope"), 404)
    assert_problem(await api.get("/no/such/route"), 404)
    assert_problem(await api.delete("/enqueue"), 405)


async def test_types_api(api: httpx.AsyncClient) -> None:
    backoff = {"strategy": "exponential", "base": "1s", "factor": 3, "max": "5m", "jitter": 0.2}
    response = await api.put("/types/demo.retry", json={"queue": "high", "backoff": backoff})
    assert response.status_code == 201
    assert response.json()["backoff"] == {
        "strategy": "exponential", "base": 1.0, "factor": 3, "max": 300.0, "jitter": 0.2,
    }  # fmt: skip
    response = await api.put("/types/demo.retry", json={"queue": "low", "max_attempts": 9})
    assert response.status_code == 200
    assert (await api.get("/types/demo.retry")).json()["queue"] == "low"
    names = [t["name"] for t in (await api.get("/types")).json()["types"]]
    assert names == ["demo.echo", "demo.retry"]
    for body, field in [
        ({"queue": "nope"}, "queue"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"backoff": {"strategy": "random"}}, "backoff"),
        ({"backoff": {"strategy": "list", "delays": ["soon"]}}, "backoff"),
        ({"payload_schema": {"type": 12}}, "payload_schema"),
        ({"colour": 1}, "colour"),
    ]:
        assert_problem(await api.put("/types/demo.retry", json=body), 400, field)
    assert_problem(await api.put("/types/bad%20name", json={}), 400, "name")


async def test_info_openapi_health_and_metrics(api: httpx.AsyncClient, settings: Settings) -> None:
    info = (await api.get("/")).json()
    assert info["service"] == "taskq" and info["namespace"] == settings.namespace
    assert info["queues"] == settings.queues
    spec = (await api.get("/openapi.json")).json()
    for path in ("/enqueue", "/enqueue/batch", "/tasks/{id}", "/tasks/{id}/events", "/healthz",
                 "/metrics", "/types", "/types/{name}", "/", "/openapi.json"):  # fmt: skip
        assert path in spec["paths"], path
    assert "EnqueueRequest" in spec["components"]["schemas"]
    health = await api.get("/healthz")
    assert health.json() == {"status": "ok", "database": "ok", "broker": "ok", "topology": "ok"}
    await api.post("/enqueue", json={"type": "demo.echo", "payload": {}})
    await api.post("/enqueue", json={"type": "demo.echo", "payload": []})
    text = (await api.get("/metrics")).text
    assert 'taskq_enqueue_total{outcome="created",queue="default",type="demo.echo"} 1.0' in text
    assert 'taskq_enqueue_total{outcome="invalid",queue="",type=""} 1.0' in text
    assert "taskq_enqueue_latency_seconds_bucket" in text
    assert "taskq_unpublished_tasks" in text
    assert "taskq_publish_failures_total 0.0" in text


async def test_health_names_missing_topology(settings: Settings) -> None:
    async with running_api(settings) as api:  # the topology was never declared
        body = assert_problem(await api.get("/healthz"), 503)
        assert body["health"] == "error" and body["topology"].startswith("missing:")


async def test_a_row_the_database_refuses_fails_alone(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    # Validation cannot foresee every refusal; concurrent requests share one INSERT,
    # and only the refused row may fail (400), never its neighbours.
    connection = await asyncpg.connect(settings.database_url)
    try:
        await connection.execute(
            "ALTER TABLE tasks ADD CONSTRAINT test_no_poison CHECK (payload->>'poison' IS NULL)"
        )
    finally:
        await connection.close()
    bodies = [{**E, "payload": {"n": n}} for n in range(30)]
    bodies.insert(15, {**E, "payload": {"poison": 1}})
    responses = await asyncio.gather(*(api.post("/enqueue", json=body) for body in bodies))
    codes = [response.status_code for response in responses]
    assert codes.count(201) == 30
    assert_problem(responses[15], 400, "body")
    assert await count_tasks(settings) == 30


async def test_the_enqueue_fast_path_answers_like_the_routed_api(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /enqueue skips Starlette's routing: same answers, counts and 500s as other routes."""
    created = await api.post("/enqueue", json={"type": "demo.echo", "payload": {}})
    assert created.status_code == 201, created.text
    json_type = {"content-type": "application/json"}
    assert_problem(await api.post("/enqueue", content=b"{nope", headers=json_type), 400, "body")
    assert_problem(
        await api.post("/enqueue", content=b"{}", headers={"content-type": "text/plain"}), 415
    )
    assert (await api.get("/enqueue")).status_code == 405  # other methods still go through routing

    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    # A body in several messages (chunked, no Content-Length) is read whole, and refused
    # once it passes the limit.
    whole = chunks(b'{"type": "demo.echo", ', b'"payload": {"n": 1}}')
    assert (await api.post("/enqueue", content=whole, headers=json_type)).status_code == 201
    limit = app_settings(api).max_payload_bytes
    endless = chunks(
        b'{"type": "demo.echo", "payload": {"s": "', *[b"x" * 65536] * (limit // 65536 + 2)
    )
    assert_problem(await api.post("/enqueue", content=endless, headers=json_type), 413, "body")
    metrics = (await api.get("/metrics")).text
    assert 'taskq_http_requests_total{route="enqueue",status="201"} 2.0' in metrics
    assert 'taskq_http_requests_total{route="enqueue",status="400"} 1.0' in metrics
    assert 'taskq_http_requests_total{route="enqueue",status="413"} 1.0' in metrics

    app = api.app  # type: ignore[attr-defined]

    async def broken(data: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.client, "submit", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        failed = await client.post("/enqueue", json={"type": "demo.echo", "payload": {}})
    body = assert_problem(failed, 500)
    assert "a bug" not in failed.text and body["title"] == "Internal error"


def app_settings(api: httpx.AsyncClient) -> Settings:
    settings: Settings = api.app.state.settings  # type: ignore[attr-defined]
    return settings


async def test_an_insert_waiting_for_a_key_does_not_hold_up_the_others(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Single enqueues share one insert statement at a time; one that waits (for an
    idempotency key another transaction is inserting) gets the others a statement beside it."""
    client = api.app.state.client  # type: ignore[attr-defined]
    holder = await asyncpg.connect(settings.database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await client.enqueue("demo.echo", {"held": 1}, idempotency_key="held", connection=holder)
        request = {"type": "demo.echo", "payload": {"held": 1}, "idempotency_key": "held"}
        waiting = asyncio.create_task(api.post("/enqueue", json=request))
        waits = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        while not await holder.fetchval(waits + " AND wait_event_type = 'Lock'"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # until its statement waits for the key's lock
        others = [
            api.post("/enqueue", json={"type": "demo.echo", "payload": {"n": n}}) for n in range(5)
        ]
        answers = await asyncio.wait_for(asyncio.gather(*others), 10)  # no commit needed
        assert [a.status_code for a in answers] == [201] * 5
        assert not waiting.done()
        await transaction.commit()
        replay = await asyncio.wait_for(waiting, 10)
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    finally:
        await holder.close()
