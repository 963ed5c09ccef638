"""Unique keys (pure): the ``unique`` object checked field by field, the key a task holds
(literal, the whole payload, a payload path; bounded in size), the enqueue's ``unique``
winning over the type's, and the decorator's ``unique=`` checked at import."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from taskq.enqueue.task_types import TaskType, check_type
from taskq.enqueue.validation import enqueue_task, task_type, with_unique
from taskq.errors import InvalidRequest
from taskq.handlers import Context, HandlerError, Registry
from taskq.model import TaskTypeRecord
from taskq.store import UniqueKey
from taskq.unique import MAX_VALUE_CHARS, Unique, parse, task_key
from tests.support.services import make_settings

SETTINGS = make_settings()


def fields(data: Any) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as info:
        parse(data)
    return {error.field: error.message for error in info.value.errors}


def test_defaults_and_every_field() -> None:
    assert parse({}) == Unique("$", "active", None, False)
    spec = parse({"key": "$.a.b", "while": "queued", "for": "10m", "on_conflict": "replace"})
    assert spec == Unique("$.a.b", "queued", 600.0, True)
    assert spec.to_json() == {"key": "$.a.b", "while": "queued", "for": 600.0,
                              "on_conflict": "replace"}  # fmt: skip
    assert parse(spec.to_json()) == spec  # what the registry stores reads back the same
    assert parse({"key": "report", "while": "until_finished", "for": 1}).for_seconds == 1.0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("k", "unique"),
        ({"key": 5}, "unique.key"),
        ({"key": ""}, "unique.key"),
        ({"key": "x" * 256}, "unique.key"),
        ({"key": "a\x00"}, "unique.key"),
        ({"key": "$a"}, "unique.key"),
        ({"key": "$."}, "unique.key"),
        ({"key": "$.a..b"}, "unique.key"),
        ({"key": "$.a b"}, "unique.key"),
        ({"key": "$" + ".a" * 17}, "unique.key"),
        ({"while": "done"}, "unique.while"),
        ({"for": "0s"}, "unique.for"),
        ({"for": "367d"}, "unique.for"),
        ({"for": "later"}, "unique.for"),
        ({"for": True}, "unique.for"),
        ({"on_conflict": "update"}, "unique.on_conflict"),
        ({"other": 1}, "unique.other"),
    ],
)
def test_a_bad_unique_names_its_field(data: Any, field: str) -> None:
    assert field in fields(data)


def test_keys_are_per_type_and_literal_keys_never_equal_path_keys() -> None:
    payload = {"user": {"id": 7}, "n": 1.0}
    assert task_key(Unique("nightly"), "a.v1", payload, "f") == "a.v1/nightly"
    assert task_key(Unique("$.user.id"), "a.v1", payload, "f") == "a.v1/$.user.id=7"
    assert task_key(Unique("$.n"), "a.v1", payload, "f") == "a.v1/$.n=1"  # 1.0 is 1
    assert task_key(Unique("$.user"), "a.v1", payload, "f") == 'a.v1/$.user={"id":7}'
    whole = task_key(Unique("$"), "a.v1", {"b": 1, "a": [2]}, "f")
    assert (
        whole == task_key(Unique("$"), "a.v1", {"a": [2], "b": 1}, "f") == 'a.v1/$={"a":[2],"b":1}'
    )
    assert task_key(Unique("$.s"), "a.v1", {"s": "7"}, "f") != task_key(
        Unique("$.s"), "a.v1", {"s": 7}, "f"
    )


def test_a_large_value_is_keyed_by_its_hash() -> None:
    key = task_key(Unique("$.blob"), "t", {"blob": "x" * 10_000}, "f")
    assert key.startswith("t/$.blob=sha256:") and len(key) == len("t/$.blob=sha256:") + 64
    small = "y" * (MAX_VALUE_CHARS - 2)  # its JSON, quoted, is MAX_VALUE_CHARS long
    assert task_key(Unique("$.blob"), "t", {"blob": small}, "f") == f't/$.blob="{small}"'


@pytest.mark.parametrize("payload", [{}, {"user": 5}, {"user": {"other": 1}}, {"user": None}])
def test_a_path_the_payload_lacks_names_the_field(payload: dict[str, Any]) -> None:
    if payload == {"user": None}:  # null is a value
        assert task_key(Unique("$.user"), "t", payload, "f") == "t/$.user=null"
        return
    with pytest.raises(InvalidRequest) as info:
        task_key(Unique("$.user.id"), "t", payload, "tasks[2].unique.key")
    [error] = info.value.errors
    assert error.field == "tasks[2].unique.key" and "$.user.id" in error.message


def test_the_enqueues_unique_wins_over_the_types() -> None:
    request = {"type": "t.v1", "payload": {"a": 1, "b": 2}}
    task, body = enqueue_task(request, SETTINGS)
    assert with_unique(task, body, None, "") is task  # neither: nothing to do
    typed = with_unique(task, body, Unique("$.a", "queued", 60.0, True), "")
    assert typed.unique == UniqueKey("t.v1/$.a=1", "queued", 60.0, True)
    task, body = enqueue_task({**request, "unique": {"key": "$.b"}}, SETTINGS)
    own = with_unique(task, body, Unique("$.a", "queued"), "")
    assert own.unique == UniqueKey("t.v1/$.b=2", "active", None, False)
    missing, missing_body = enqueue_task({**request, "unique": {"key": "$.c"}}, SETTINGS)
    with pytest.raises(InvalidRequest) as info:
        with_unique(missing, missing_body, None, "tasks[0].")
    assert info.value.errors[0].field == "tasks[0].unique.key"
    with pytest.raises(InvalidRequest) as info:
        with_unique(task, enqueue_task(request, SETTINGS)[1], Unique("$.c"), "")
    assert info.value.errors[0].field == "payload"  # the type's path: the payload lacks it


def test_a_bad_unique_in_an_enqueue_is_named_with_the_other_errors() -> None:
    with pytest.raises(InvalidRequest) as info:
        enqueue_task(
            {"type": "t", "payload": {}, "queue": "nope", "unique": {"for": "x"}}, SETTINGS
        )
    assert {e.field for e in info.value.errors} == {"queue", "unique.for"}


def test_a_task_type_stores_its_unique_normalised() -> None:
    definition = task_type("t.v1", {"unique": {"key": "$.a", "for": "1h"}}, SETTINGS)
    assert definition.unique_json == (
        '{"key":"$.a","while":"active","for":3600.0,"on_conflict":"keep"}'
    )
    assert task_type("t.v1", {}, SETTINGS).unique_json is None
    with pytest.raises(InvalidRequest) as info:
        task_type("t.v1", {"unique": {"while": 1}}, SETTINGS)
    assert info.value.errors[0].field == "unique.while"


def test_the_decorator_checks_unique_at_import() -> None:
    handlers = Registry()

    @handlers.task("a.v1", unique={"key": "$.user", "while": "queued"})
    async def a(payload: dict[str, Any], ctx: Context) -> None: ...

    handler = handlers.get("a.v1")
    assert handler is not None and handler.unique == Unique("$.user", "queued")
    with pytest.raises(HandlerError, match=r"b\.v1: invalid unique: unique\.while"):
        handlers.task("b.v1", unique={"while": "sometimes"})
    with pytest.raises(HandlerError, match=r"unique\.key"):
        handlers.task("c.v1", unique={"key": "$.a..b"})


def test_a_types_unique_written_by_hand_that_does_not_parse_refuses_its_enqueues() -> None:
    now = datetime.now(UTC)
    good = TaskTypeRecord("t.v1", "default", 5, 30.0, None, None, True, now, now, '{"key": "$.a"}')
    assert TaskType.from_record(good).unique == Unique("$.a")
    bad = replace(good, unique_spec='{"while": "sometimes"}')
    task_type_ = TaskType.from_record(bad)
    assert task_type_.unique is None and task_type_.unique_broken
    with pytest.raises(InvalidRequest) as info:
        check_type(task_type_, "t.v1", None, ["default"], "tasks[1].")
    [error] = info.value.errors
    assert error.field == "tasks[1].type" and "unique is unusable" in error.message
