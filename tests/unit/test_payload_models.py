"""Task definitions and payload models: signatures read once, adapters, schemas, enqueue."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, assert_type

import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field, RootModel
from typing_extensions import TypedDict

from taskq import Client, Context, EnqueueResult, Registry, TaskDefinition, payloads
from taskq.definitions import EnqueueManyOptions, EnqueueOptions
from taskq.enqueue import requests, task_types
from taskq.enqueue.schemas import PayloadValidator
from taskq.errors import HandlerError, InvalidRequest
from taskq.handlers import registration
from taskq.model import TaskStatus
from taskq.settings import load_settings
from taskq.testing import run_handler

SETTINGS = load_settings(max_result_bytes=10_000)


class Address(BaseModel):
    city: str = Field(pattern=r"^[A-Z]")


class Person(BaseModel):
    name: str
    address: Address
    tags: list[str] = []


class Point(TypedDict):
    x: int
    y: int


@dataclasses.dataclass
class Receipt:
    sent: bool
    to: str


class Tree(BaseModel):
    name: str
    children: list[Tree] = []


class PlainTypedDict(typing.TypedDict):
    x: int


class Lookahead(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")
    code: str = Field(pattern=r"^(?=a)")


handlers = Registry()


@handlers.task("test.person.v1", max_attempts=3)
async def greet(payload: Person, ctx: Context) -> Receipt:
    return Receipt(sent=True, to=payload.address.city)


@handlers.task("test.point.v1")
def norm(payload: Point, ctx: Context) -> int:
    return payload["x"] + payload["y"]


@handlers.task("test.plain.v1")
async def plain(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return payload


@handlers.task("test.receipt.v1")
def receipt_only(payload: dict[str, Any], ctx: Context) -> list[Receipt]:
    return [Receipt(sent=True, to=payload["to"])]


def _one(name: str, function: Any) -> TaskDefinition[Any, Any]:
    return Registry().task(name)(function)


# ---------------------------------------------------------------- definitions


def test_a_definition_is_its_function_with_a_name_and_a_handler() -> None:
    assert greet.name == "test.person.v1"
    assert greet.handler is handlers.get("test.person.v1")
    assert greet.__name__ == "greet" and greet.__wrapped__ is greet.function
    assert registration(greet) is greet.handler
    assert registration(greet.function) is greet.handler
    assert norm({"x": 1, "y": 2}, None) == 3  # type: ignore[arg-type]  # called as the function


def test_a_definition_registers_again_in_another_registry() -> None:
    again = Registry().task("test.person.v2")(greet)
    assert again.function is greet.function
    assert again.handler.payload_schema_json == greet.handler.payload_schema_json


def test_a_plain_handler_pays_nothing() -> None:
    assert plain.model is None
    assert plain.handler.function is plain.function  # called by the worker as it is
    assert plain.handler.payload_schema_json is None


class _AsyncClient:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def enqueue(
        self, task: TaskDefinition[Any, Any] | str, payload: Any, **options: Any
    ) -> str:
        self.calls.append((task, payload, options))
        return "async"


class _SyncClient:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def enqueue(self, task: TaskDefinition[Any, Any] | str, payload: Any, **options: Any) -> str:
        self.calls.append((task, payload, options))
        return "sync"

    def enqueue_many(
        self,
        items: TaskDefinition[Any, Any] | str | Sequence[Any],
        payloads: Iterable[Any] | None = None,
        **options: Any,
    ) -> list[str]:
        self.calls.append((items, list(payloads or ()), options))
        return ["sync"]


async def test_enqueue_returns_what_the_client_returns() -> None:
    person = Person(name="a", address=Address(city="B"))
    async_client, sync_client = _AsyncClient(), _SyncClient()
    awaitable = greet.enqueue(async_client, person, delay=5, idempotency_key="k")
    assert await assert_type(awaitable, Coroutine[Any, Any, str]) == "async"
    answer = greet.enqueue(sync_client, {"name": "a"}, queue="high")
    assert_type(answer, str)
    assert answer == "sync"
    assert async_client.calls == [(greet, person, {"delay": 5, "idempotency_key": "k"})]
    assert sync_client.calls == [(greet, {"name": "a"}, {"queue": "high"})]
    many = greet.enqueue_many(sync_client, [person], idempotency_keys=["a"])
    assert_type(many, list[str])
    assert sync_client.calls[-1] == (greet, [person], {"idempotency_keys": ["a"]})


def test_the_asyncio_client_is_an_enqueuing_client() -> None:
    def typed(client: Client) -> None:
        # Checked by mypy: Client satisfies both protocols, its answers awaitable.
        one = greet.enqueue(client, {})
        assert_type(one, Coroutine[Any, Any, EnqueueResult]).close()
        many = greet.enqueue_many(client, [])
        assert_type(many, Coroutine[Any, Any, list[EnqueueResult]]).close()

    assert set(EnqueueOptions.__annotations__) <= set(Client.enqueue.__annotations__)
    options = set(EnqueueManyOptions.__annotations__)
    assert options <= set(Client.enqueue_many.__annotations__)


def test_enqueue_result_is_typed() -> None:
    task_id = "6f1c4a36-8e47-4ad5-9f55-3f3c1b0d6d0b"
    answer = {"id": task_id, "status": "ENQUEUED", "type": "t", "queue": "default"}
    answer["run_at"] = "2026-01-01T00:00:00+00:00"
    result = EnqueueResult(True, answer)
    assert str(result.id) == task_id and result.id.version == 4
    assert result.status is TaskStatus.ENQUEUED
    assert (result.type, result.queue, result.created) == ("t", "default", True)
    assert result.run_at.year == 2026


# ---------------------------------------------------------------- signatures


def test_payload_and_result_models_are_found() -> None:
    assert greet.model is not None and norm.model is not None and receipt_only.model is not None
    assert greet.model.payload is not None and greet.model.result is not None
    assert norm.model.payload is not None and norm.model.result is None
    assert receipt_only.model.payload is None and receipt_only.model.result is not None
    assert receipt_only.handler.payload_schema_json is None


def test_an_annotation_that_cannot_be_resolved_is_refused() -> None:
    namespace: dict[str, Any] = {}
    exec(
        "from __future__ import annotations\ndef handler(payload: Missing, ctx): ...\n",
        namespace,
    )
    with pytest.raises(HandlerError, match="cannot resolve the payload annotation 'Missing'"):
        _one("test.missing", namespace["handler"])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (PlainTypedDict, "typing_extensions.TypedDict"),
        (RootModel[list[int]], "must describe a JSON object"),
        (Lookahead, "RE2 cannot run the pattern"),
    ],
)
def test_a_model_taskq_cannot_use_is_refused_at_registration(model: Any, message: str) -> None:
    def handler(payload: Any, ctx: Context) -> None: ...

    handler.__annotations__["payload"] = model
    with pytest.raises(HandlerError, match=message):
        _one("test.refused", handler)


def test_adapters_are_built_once_at_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_adapter(*args: Any) -> None:
        raise AssertionError("an adapter built per call")

    monkeypatch.setattr(payloads, "TypeAdapter", no_adapter)
    assert norm.handler.function({"x": 1, "y": 2}, None) == 3  # type: ignore[arg-type]


# ---------------------------------------------------------------- the worker's call


async def test_the_handler_receives_the_parsed_object() -> None:
    outcome = await run_handler(
        greet, {"name": "a", "address": {"city": "Bern"}}, settings=SETTINGS
    )
    assert outcome.succeeded
    assert outcome.result == {"sent": True, "to": "Bern"}  # the dataclass, serialised


async def test_a_payload_that_does_not_validate_fails_at_once_naming_the_field() -> None:
    outcome = await run_handler(
        greet, {"name": "a", "address": {"city": "bern"}}, settings=SETTINGS
    )
    assert outcome.failed  # not retried, though attempts are left
    assert outcome.error is not None
    assert "payload.address.city: String should match pattern" in outcome.error
    missing = await run_handler(greet, {"address": {}}, settings=SETTINGS)
    assert missing.failed and missing.error is not None
    assert "payload.name: Field required" in missing.error
    assert "payload.address.city: Field required" in missing.error


async def test_run_handler_takes_a_model_instance() -> None:
    person = Person(name="a", address=Address(city="Z"), tags=["x"])
    outcome = await run_handler(greet, person, settings=SETTINGS)
    assert outcome.result == {"sent": True, "to": "Z"}


async def test_a_result_that_does_not_serialise_fails() -> None:
    def handler(payload: dict[str, Any], ctx: Context) -> Receipt:
        return Receipt(sent=True, to=object())  # type: ignore[arg-type]

    outcome = await run_handler(handler, {}, settings=SETTINGS)
    assert outcome.failed and outcome.error is not None
    assert "does not serialise through its annotation" in outcome.error


# ---------------------------------------------------------------- schemas and payloads


def test_the_schema_is_the_models_with_the_generated_key() -> None:
    assert greet.model is not None and greet.model.schema is not None
    schema = orjson.loads(greet.handler.payload_schema_json or "null")
    assert schema == greet.model.schema
    assert schema[payloads.GENERATED_KEY] == "the payload model of greet"
    assert schema["properties"]["address"] == {"$ref": "#/$defs/Address"}


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"name": "a", "address": {"city": "bern"}}, "payload.address.city", "does not match"),
        ({"name": "a", "address": {}}, "payload.address", "'city' is a required property"),
        ({"name": 1, "address": {"city": "B"}}, "payload.name", "is not of type 'string'"),
        ({"name": "a", "address": {"city": "B"}, "tags": [3]}, "payload.tags[0]", "not of type"),
    ],
)
def test_the_enqueue_path_checks_the_schema_naming_the_field(
    payload: dict[str, Any], field: str, message: str
) -> None:
    assert greet.model is not None and greet.model.schema is not None
    schema = greet.model.schema
    task_type = task_types.TaskType(
        "test.person.v1", "default", 3, 1.0, None, schema, True, None, PayloadValidator(schema)
    )
    good = {"name": "a", "address": {"city": "B"}}
    assert task_types.check_payloads([("", task_type, good)], [0]) == []
    [error] = task_types.check_payloads([("", task_type, payload)], [0])
    [found] = error.errors
    assert found.field == field and message in found.message


def test_a_recursive_model_is_checked_through_its_refs() -> None:
    definition = _one("test.tree", _tree)
    assert definition.model is not None and definition.model.schema is not None
    schema = definition.model.schema
    assert "Tree" in schema["$defs"]
    task_type = task_types.TaskType(
        "test.tree", "default", 3, 1.0, None, schema, True, None, PayloadValidator(schema)
    )
    deep: dict[str, Any] = {"name": "leaf"}
    for _ in range(40):
        deep = {"name": "node", "children": [deep]}
    assert task_types.check_payloads([("", task_type, deep)], [0]) == []
    deep["children"][0]["children"][0]["name"] = 7
    [error] = task_types.check_payloads([("", task_type, deep)], [0])
    assert error.errors[0].field == "payload.children[0].children[0].name"


def _tree(payload: Tree, ctx: Context) -> int:
    return len(payload.children)


def test_payloads_become_json_objects() -> None:
    person = Person(name="a", address=Address(city="B"))
    expected = {"name": "a", "address": {"city": "B"}, "tags": []}
    assert greet.to_payload(person) == expected
    assert plain.to_payload(person) == expected  # any model instance, by its own adapter
    assert plain.to_payload(Receipt(True, "x")) == {"sent": True, "to": "x"}
    untouched = {"a": 1}
    assert greet.to_payload(untouched) is untouched
    assert payloads.to_payload([1]) == [1]  # left to the enqueue's checks to refuse
    with pytest.raises(InvalidRequest, match="payload: must serialise to a JSON object"):
        payloads.to_payload(RootModel[list[int]]([1]))


def test_enqueue_many_bodies_name_their_faults() -> None:
    items = requests.bodies(greet, [{"a": 1}, {"b": 2}], "high", None, ["k", None], 5, None, None)
    assert items == [
        {
            "type": "test.person.v1",
            "payload": {"a": 1},
            "queue": "high",
            "idempotency_key": "k",
            "delay": 5,
        },
        {"type": "test.person.v1", "payload": {"b": 2}, "queue": "high", "delay": 5},
    ]
    given = [{"type": "t", "payload": {}}]
    assert requests.bodies(given, None, None, None, None, None, None, None) is given
    with pytest.raises(InvalidRequest, match="idempotency_keys: one key"):
        requests.bodies("t", [{}], None, None, [], None, None, None)
    with pytest.raises(InvalidRequest, match=r"tasks\[1\]\.payload: must serialise"):
        requests.bodies("t", [{}, RootModel[list[int]]([1])], None, None, None, None, None, None)
    with pytest.raises(InvalidRequest) as misplaced:
        requests.bodies(given, [{}], "high", None, None, None, "2030-01-01T00:00:00Z", None)
    assert [e.field for e in misplaced.value.errors] == ["payloads", "queue", "run_at"]
    with pytest.raises(InvalidRequest, match="payloads: required"):
        requests.bodies(greet, None, None, None, None, None, None, None)
