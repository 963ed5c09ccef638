"""Typed task handles and payload models through Postgres and RabbitMQ: the worker hands the
handler the parsed object and registers the model's schema, which ``POST /enqueue`` then
checks; ``.enqueue`` on a definition answers typed results; an operator's schema stays."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from typing import Any

import httpx
import orjson
import pytest
from pydantic import BaseModel, Field

from taskq import Client, Context, Registry, TaskDefinition
from taskq.errors import InvalidRequest
from taskq.model import TaskStatus
from taskq.payloads import GENERATED_KEY
from taskq.settings import Settings
from taskq.store import Store
from tests.support.api_fixtures import assert_problem, declare_topology, running_api
from tests.support.worker_fixtures import harness, running_worker

pytestmark = pytest.mark.integration


class Recipient(BaseModel):
    address: str = Field(pattern=r"^[^@]+@[^@]+$")


class Email(BaseModel):
    to: Recipient
    subject: str
    copies: int = Field(default=1, ge=1)


@dataclasses.dataclass
class Sent:
    to: str
    subject: str
    model: str


handlers = Registry()
received: list[Any] = []


@handlers.task("models.email.v1", max_attempts=3)
async def send_email(payload: Email, ctx: Context) -> Sent:
    received.append(payload)
    return Sent(payload.to.address, payload.subject, type(payload).__name__)


@handlers.task("models.email_sync.v1", max_attempts=3)
def send_email_sync(payload: Email, ctx: Context) -> Sent:
    received.append(payload)
    return Sent(payload.to.address, payload.subject, type(payload).__name__)


EMAIL = Email(to=Recipient(address="a@example.com"), subject="hi")


@pytest.fixture(autouse=True)
def _forget_received() -> None:
    received.clear()


@pytest.mark.parametrize("definition", [send_email, send_email_sync], ids=["async", "sync"])
async def test_the_worker_hands_the_handler_the_parsed_object(
    settings: Settings, definition: TaskDefinition[Email, Any]
) -> None:
    await declare_topology(settings)
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        result = await definition.enqueue(client, EMAIL, idempotency_key="one")
        assert isinstance(result.id, uuid.UUID)
        assert result.status is TaskStatus.ENQUEUED and result.created
        assert result.type == definition.name and result.queue == "default"
        row = await h.wait_for(result.id, "SUCCEEDED", "FAILED")
        again = await definition.enqueue(client, EMAIL, idempotency_key="one")
    assert (row.status, row.attempts) == ("SUCCEEDED", 1), row.last_error
    assert row.payload is not None
    assert json.loads(row.payload) == {
        "to": {"address": "a@example.com"},
        "subject": "hi",
        "copies": 1,
    }
    assert row.result is not None
    assert json.loads(row.result) == {"to": "a@example.com", "subject": "hi", "model": "Email"}
    assert received == [EMAIL]
    assert again.id == result.id and not again.created  # an idempotent replay


async def test_a_payload_the_model_refuses_fails_at_once_naming_the_field(
    settings: Settings,
) -> None:
    async with harness(settings) as h, running_worker(settings, handlers):
        # Inserted past the API's checks, as a task enqueued before the schema was.
        bad = {"to": {"address": "nobody"}, "subject": "hi"}
        task_id = await h.enqueue("models.email.v1", bad)
        row = await h.wait_for(task_id, "FAILED", "SUCCEEDED")
    assert (row.status, row.attempts, row.max_attempts) == ("FAILED", 1, 3)
    assert row.last_error is not None
    assert "payload.to.address: String should match pattern" in row.last_error
    assert received == []


async def test_post_enqueue_checks_the_schema_the_worker_registered(settings: Settings) -> None:
    await declare_topology(settings)
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        running_api(settings) as api,
    ):
        stored = await api.get("/types/models.email.v1")
        schema = stored.json()["payload_schema"]
        assert schema[GENERATED_KEY] == "the payload model of send_email"
        assert schema["properties"]["to"] == {"$ref": "#/$defs/Recipient"}
        bad = {"type": "models.email.v1", "payload": {"to": {"address": 5}, "subject": "x"}}
        # The API's type cache takes the worker's schema up within seconds.
        await _until_refused(api, bad, "payload.to.address")
        wrong = {"type": "models.email.v1", "payload": {"to": {"address": "x"}, "subject": "x"}}
        assert_problem(await api.post("/enqueue", json=wrong), 400, "payload.to.address")
        few = {"type": "models.email.v1", "payload": {"subject": "x", "copies": 0}}
        assert_problem(await api.post("/enqueue", json=few), 400)
        good = {"type": "models.email.v1", "payload": EMAIL.model_dump()}
        created = await api.post("/enqueue", json=good)
        assert created.status_code == 201, created.text
        row = await h.wait_for(uuid.UUID(created.json()["id"]), "SUCCEEDED", "FAILED")
    assert row.status == "SUCCEEDED", row.last_error
    assert received == [EMAIL]


async def _until_refused(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    """Post ``body`` until the answer is a 400 naming ``field`` (20 s at most)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        response = await api.post("/enqueue", json=body)
        if response.status_code == 400 and response.json().get("field") == field:
            return
        assert asyncio.get_running_loop().time() < deadline, response.text
        await asyncio.sleep(0.05)


async def test_enqueue_many_and_the_client_take_definitions_and_models(settings: Settings) -> None:
    await declare_topology(settings)
    async with (
        harness(settings) as h,
        running_worker(settings, handlers),
        Client.connect(settings) as client,
    ):
        results = await send_email.enqueue_many(
            client, [EMAIL, {"to": {"address": "b@example.com"}, "subject": "yo"}]
        )
        by_name = await client.enqueue("models.email_sync.v1", EMAIL, delay=0)
        rows = [await h.wait_for(r.id, "SUCCEEDED", "FAILED") for r in [*results, by_name]]
        with pytest.raises(InvalidRequest) as refused:
            await send_email.enqueue_many(client, [EMAIL, {"to": {"address": 3}, "subject": "x"}])
        with pytest.raises(InvalidRequest) as misplaced:
            await client.enqueue_many([{"type": send_email.name, "payload": {}}], queue="high")
        with pytest.raises(InvalidRequest) as missing:
            await client.enqueue_many(send_email)
    assert [r.status for r in rows] == ["SUCCEEDED"] * 3
    assert all(r.created and r.status is TaskStatus.ENQUEUED for r in results)
    assert [e.field for e in refused.value.errors] == ["tasks[1].payload.to.address"]
    assert [e.field for e in misplaced.value.errors] == ["queue"]
    assert [e.field for e in missing.value.errors] == ["payloads"]
    assert len(received) == 3


async def test_a_workers_schema_never_replaces_an_operators(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    await declare_topology(settings)
    operator = {"type": "object", "required": ["to"]}
    async with harness(settings) as h:

        async def put(schema: dict[str, Any] | None) -> None:
            await h.store.put_task_type(
                "models.email.v1",
                queue="default",
                max_attempts=3,
                timeout_seconds=30.0,
                backoff_json=None,
                payload_schema_json=None if schema is None else json.dumps(schema),
                enabled=True,
            )

        async def stored() -> Any:
            [found] = [t for t in await h.store.task_types() if t.name == "models.email.v1"]
            return None if found.payload_schema is None else json.loads(found.payload_schema)

        await put(operator)  # as PUT /types/models.email.v1 does
        with caplog.at_level(logging.WARNING, logger="taskq.worker"):
            async with running_worker(settings, handlers):
                kept = await stored()
        assert kept == operator
        assert any(
            "keeps the payload_schema an operator set" in r.getMessage() for r in caplog.records
        )
    # That a type without an operator's schema is the workers' again is checked at
    # the store (test_registering_replaces_only_a_workers_schema): a second worker
    # started in this process after the first one stopped hung in CI once (a hang
    # not yet understood; see the session note).


async def test_registering_replaces_only_a_workers_schema(settings: Settings) -> None:
    store = await Store.connect(settings.database_url, schema=settings.db_schema)
    try:

        async def register(name: str, schema: dict[str, Any] | None) -> Any:
            text = None if schema is None else orjson.dumps(schema).decode()
            await store.register_task_types([(name, "default", 3, 30.0, None, text)])
            [found] = [t for t in await store.task_types() if t.name == name]
            return None if found.payload_schema is None else json.loads(found.payload_schema)

        first = {"type": "object", GENERATED_KEY: "v1"}
        second = {"type": "object", "required": ["a"], GENERATED_KEY: "v2"}
        assert await register("t.worker", first) == first
        assert await register("t.worker", second) == second  # a new model version
        assert await register("t.worker", None) is None  # the handler lost its model
        operator = {"type": "object", "required": ["b"]}
        await store.put_task_type(
            "t.operator",
            queue="default",
            max_attempts=3,
            timeout_seconds=30.0,
            backoff_json=None,
            payload_schema_json=json.dumps(operator),
            enabled=True,
        )
        assert await register("t.operator", first) == operator
        assert await register("t.operator", None) == operator
    finally:
        await store.close()
