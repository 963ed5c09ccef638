"""Validation of enqueue requests and task type definitions (pure): every field at fault
is named, values are normalised, and nothing else is accepted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from taskq.enqueue.validation import (
    MAX_BATCH,
    TOO_DEEP,
    FieldError,
    InvalidRequest,
    TooLarge,
    batch_items,
    enqueue_task,
    fingerprint,
    parse_rfc3339,
    raise_all,
    task_type,
)
from tests.support.services import make_settings

SETTINGS = make_settings(max_delay="1h", max_payload_bytes=1000)


def refused(data: Any, *, prefix: str = "") -> dict[str, str]:
    """The fields ``enqueue_task`` names, each with its message."""
    with pytest.raises(InvalidRequest) as info:
        enqueue_task(data, SETTINGS, prefix=prefix)
    return {error.field: error.message for error in info.value.errors}


def test_a_valid_request_becomes_a_new_task() -> None:
    task, body = enqueue_task(
        {"type": "email.send.v1", "payload": {"to": "a@b"}, "queue": "high", "delay": 5,
         "max_attempts": 3.0, "idempotency_key": "k", "timeout": 2.5},
        SETTINGS,
    )  # fmt: skip
    assert (task.type, task.queue, task.max_attempts, task.delay) == ("email.send.v1", "high", 3, 5)
    assert orjson.loads(task.payload_json) == {"to": "a@b"}
    assert (task.idempotency_key, task.timeout, task.run_at) == ("k", 2.5, None)
    assert task.fingerprint is not None and body.max_attempts == 3


def test_a_minimal_request_leaves_the_rest_to_the_type() -> None:
    task, _ = enqueue_task({"type": "t", "payload": {}}, SETTINGS)
    assert (task.queue, task.max_attempts, task.fingerprint, task.timeout) == (None,) * 4


def test_every_field_at_fault_is_named_at_once() -> None:
    errors = refused(
        {"type": "no spaces", "payload": {}, "queue": "nope", "delay": 7200,
         "idempotency_key": "a\x00b"}
    )  # fmt: skip
    assert set(errors) == {"type", "queue", "delay", "idempotency_key"}
    assert errors["delay"] == "at most 3600 seconds"
    assert "unknown queue" in errors["queue"]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"payload": {}}, "type", "required"),
        ({"type": "t"}, "payload", "required"),
        ({"type": "t", "payload": [1]}, "payload", "valid dictionary"),
        ({"type": "t", "payload": {}, "colour": "red"}, "colour", "unknown field"),
        ({"type": "t", "payload": {}, "max_attempts": "3"}, "max_attempts", "valid integer"),
        ({"type": "t", "payload": {}, "max_attempts": 0}, "max_attempts", "greater than"),
        ({"type": "t", "payload": {}, "max_attempts": 2.5}, "max_attempts", "valid integer"),
        ({"type": "t", "payload": {}, "timeout": 0}, "timeout", "greater than"),
        ({"type": "t", "payload": {}, "delay": -1}, "delay", "greater than or equal"),
        ({"type": "t", "payload": {}, "delay": 1, "run_at": "2000-01-01T00:00:00Z"}, "run_at",
         "not both"),
        ({"type": "t", "payload": {}, "run_at": "tomorrow"}, "run_at", "RFC 3339"),
        ({"type": "t", "payload": {"s": "a\x00"}}, "payload", "NUL"),
    ],
)  # fmt: skip
def test_a_bad_field_is_named(data: dict[str, Any], field: str, message: str) -> None:
    errors = refused(data)
    assert field in errors, errors
    assert message in errors[field], errors


def test_a_body_that_is_no_object_is_refused_as_a_whole() -> None:
    assert refused([1, 2]) == {"body": "must be a JSON object"}
    assert refused("x", prefix="tasks[4]") == {"tasks[4]": "must be a JSON object"}


def test_a_batch_item_names_its_fields_with_its_index() -> None:
    errors = refused({"type": "t", "payload": {}, "queue": "nope", "x": 1}, prefix="tasks[2]")
    assert set(errors) == {"tasks[2].x"}  # the model's errors come first, alone
    errors = refused({"type": "t", "payload": {}, "queue": "nope"}, prefix="tasks[2]")
    assert set(errors) == {"tasks[2].queue"}


def test_run_at_is_read_and_bounded_by_the_longest_delay() -> None:
    soon = datetime.now(UTC) + timedelta(minutes=5)
    task, _ = enqueue_task({"type": "t", "payload": {}, "run_at": soon.isoformat()}, SETTINGS)
    assert task.run_at == soon
    late = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    assert refused({"type": "t", "payload": {}, "run_at": late}) == {
        "run_at": "at most 3600 seconds ahead"
    }


def test_a_payload_too_large_is_its_own_error() -> None:
    with pytest.raises(TooLarge) as info:
        enqueue_task({"type": "t", "payload": {"s": "x" * 1000}}, SETTINGS)
    assert [e.field for e in info.value.errors] == ["payload"]


def test_a_payload_nested_too_deeply_is_refused() -> None:
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    assert refused({"type": "t", "payload": deep}) == {"payload": TOO_DEEP}


def test_the_fingerprint_ignores_the_key_key_order_and_absent_fields() -> None:
    one = {"type": "t", "payload": {"a": 1, "b": 2}, "idempotency_key": "k1", "queue": None}
    other = {"payload": {"b": 2, "a": 1}, "type": "t", "idempotency_key": "k2"}
    assert fingerprint(one) == fingerprint(other)
    assert fingerprint(one) != fingerprint({**one, "payload": {"a": 2, "b": 2}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-01T12:00:00Z", datetime(2030, 1, 1, 12, tzinfo=UTC)),
        ("2030-01-01t12:00:00.5z", datetime(2030, 1, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2030-01-01 14:00:00+02:00", datetime(2030, 1, 1, 12, tzinfo=UTC)),
        ("2030-12-31T23:59:60Z", datetime(2031, 1, 1, tzinfo=UTC)),  # a leap second
    ],
)
def test_rfc3339_times(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-01T12:00:00",  # no timezone
        "2030-01-01",
        "2030-01-01T12:00:00Z" + "0" * 60,  # longer than any RFC 3339 time
        "2030-13-01T12:00:00Z",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59.999999Z",  # what asyncpg would send as infinity
    ],
)
def test_rfc3339_refusals(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_a_batch_holds_1_to_1000_items() -> None:
    assert batch_items({"tasks": [{}, {}]}) == [{}, {}]
    bad_bodies: list[Any] = [{"tasks": []}, {"tasks": [{}] * (MAX_BATCH + 1)}, {"tasks": {}}, {}]
    for bad in bad_bodies:
        with pytest.raises(InvalidRequest):
            batch_items(bad)


def _field(name: str) -> FieldError:
    return FieldError(name, "wrong")


def _error(name: str) -> InvalidRequest:
    return InvalidRequest([_field(name)])


def test_raise_all_lists_every_field_and_is_413_if_one_was_too_large() -> None:
    raise_all([])  # nothing to raise
    with pytest.raises(InvalidRequest) as info:
        raise_all([_error("a"), _error("b")])
    assert type(info.value) is InvalidRequest
    assert [e.field for e in info.value.errors] == ["a", "b"]
    with pytest.raises(TooLarge) as too_large:
        raise_all([_error("a"), TooLarge([_field("b")])])
    assert [e.field for e in too_large.value.errors] == ["a", "b"]


# ----------------------------------------------------------------------------- task types


def test_a_task_type_takes_defaults_and_normalises_its_backoff() -> None:
    definition = task_type("t.v1", {}, SETTINGS)
    assert (definition.queue, definition.max_attempts, definition.timeout) == ("default", 5, 300)
    assert (definition.backoff_json, definition.payload_schema_json) == (None, None)
    definition = task_type(
        "t.v1",
        {"queue": "low", "backoff": {"strategy": "list", "delays": ["5s", "2m"]},
         "payload_schema": {"type": "object"}, "enabled": False},
        SETTINGS,
    )  # fmt: skip
    assert definition.queue == "low" and definition.enabled is False
    assert orjson.loads(definition.backoff_json or "") == {"strategy": "list", "delays": [5, 120]}
    assert orjson.loads(definition.payload_schema_json or "") == {"type": "object"}


@pytest.mark.parametrize(
    ("name", "data", "fields"),
    [
        ("bad name", {}, {"name"}),
        ("bad name", [], {"name", "body"}),
        ("t", {"queue": "nope"}, {"queue"}),
        ("t", {"backoff": {"strategy": "fixed", "delay": "soon"}}, {"backoff"}),
        ("t", {"backoff": {"strategy": "linear"}}, {"backoff"}),
        ("t", {"payload_schema": {"type": "nonsense"}}, {"payload_schema"}),
        ("t", {"max_attempts": 101}, {"max_attempts"}),
        ("t", {"colour": "red"}, {"colour"}),
    ],
)
def test_a_bad_task_type_is_refused_naming_its_fields(
    name: str, data: Any, fields: set[str]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        task_type(name, data, SETTINGS)
    assert {e.field for e in info.value.errors} == fields, info.value
