"""The envelope: its body, its AMQP properties, and what ``parse`` refuses."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from taskq.amqp.envelope import (
    HEADER_ATTEMPT,
    HEADER_DELAY,
    HEADER_DUE,
    HEADER_QUEUE,
    MAX_BODY_BYTES,
    Envelope,
    InvalidEnvelope,
)
from taskq.amqp.frames import JSON as CONTENT_TYPE
from taskq.amqp.frames import PERSISTENT
from taskq.errors import TaskqError

TASK_ID = uuid.UUID("0b7e4f2c-8d1a-4e55-9a63-2f1c4d5e6a7b")


def body(**fields: object) -> bytes:
    """A valid body with ``fields`` replaced; a field given as ``...`` is left out."""
    data: dict[str, object] = {"id": str(TASK_ID), "type": "mail.send", "attempt": 1}
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_body_round_trips() -> None:
    envelope = Envelope(TASK_ID, "mail.send", 3)
    assert json.loads(envelope.body()) == {"id": str(TASK_ID), "type": "mail.send", "attempt": 3}
    assert Envelope.parse(envelope.body()) == envelope


def test_body_is_compact() -> None:
    assert b" " not in Envelope(TASK_ID, "mail.send", 0).body()


def test_parse_ignores_unknown_fields() -> None:
    assert Envelope.parse(body(extra={"a": 1})) == Envelope(TASK_ID, "mail.send", 1)


def test_parse_accepts_attempt_zero_and_uppercase_uuid() -> None:
    parsed = Envelope.parse(body(id=str(TASK_ID).upper(), attempt=0))
    assert parsed == Envelope(TASK_ID, "mail.send", 0)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\x80\x81", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"a string"', "not a JSON object"),
        (b"42", "not a JSON object"),
        (b"null", "not a JSON object"),
        (body(id=...), "'id'"),
        (body(id=None), "'id'"),
        (body(id=123), "'id'"),
        (body(id="not-a-uuid"), "'id'"),
        (body(id=["x"]), "'id'"),
        (body(type=...), "'type'"),
        (body(type=""), "'type'"),
        (body(type=None), "'type'"),
        (body(type=5), "'type'"),
        (body(attempt=...), "'attempt'"),
        (body(attempt=None), "'attempt'"),
        (body(attempt="1"), "'attempt'"),
        (body(attempt=1.0), "'attempt'"),
        (body(attempt=1.5), "'attempt'"),
        (body(attempt=-1), "'attempt'"),
        (body(attempt=True), "'attempt'"),
        (body(attempt=False), "'attempt'"),
        (body(attempt=101), "'attempt' is larger"),
        (body(attempt=2**70), "'attempt' is larger"),
        (body(type="t" * 201), "'type' is longer"),
        (body(type="é" * 101), "'type' is longer"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    ],
)
def test_parse_refuses(raw: bytes, problem: str) -> None:
    with pytest.raises(InvalidEnvelope, match=problem):
        Envelope.parse(raw)


def test_parse_refuses_oversized_bodies_before_decoding() -> None:
    padded = body(padding="x" * MAX_BODY_BYTES)
    assert len(padded) > MAX_BODY_BYTES
    with pytest.raises(InvalidEnvelope, match="too large"):
        Envelope.parse(padded)
    # Even garbage is refused for its size first.
    with pytest.raises(InvalidEnvelope, match=f"{MAX_BODY_BYTES + 1} bytes"):
        Envelope.parse(b"\xff" * (MAX_BODY_BYTES + 1))


def test_body_at_the_size_limit_is_accepted() -> None:
    base = body(pad="")
    padded = body(pad="x" * (MAX_BODY_BYTES - len(base)))
    assert len(padded) == MAX_BODY_BYTES
    assert Envelope.parse(padded).id == TASK_ID


def test_invalid_envelope_is_a_taskq_error() -> None:
    assert issubclass(InvalidEnvelope, TaskqError)


def test_properties() -> None:
    envelope = Envelope(TASK_ID, "mail.send", 2)
    due = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    before = datetime.now(UTC)
    properties = envelope.properties("default", due=due, delay=30, headers={"x-extra": "yes"})
    assert properties.message_id == str(TASK_ID)
    assert properties.message_type == "mail.send"
    assert properties.content_type == CONTENT_TYPE == "application/json"
    assert properties.delivery_mode == PERSISTENT == 2
    assert properties.timestamp is not None
    assert properties.timestamp >= before.replace(microsecond=0) - timedelta(seconds=1)
    assert properties.headers == {
        HEADER_ATTEMPT: 2,
        HEADER_QUEUE: "default",
        HEADER_DUE: "2030-01-02T03:04:05.678+00:00",
        HEADER_DELAY: 30,
        "x-extra": "yes",
    }


def test_properties_due_is_written_in_utc() -> None:
    local = datetime(2030, 1, 2, 7, 0, tzinfo=timezone(timedelta(hours=2)))
    properties = Envelope(TASK_ID, "t", 0).properties("q", due=local)
    assert properties.headers is not None
    assert properties.headers[HEADER_DUE] == "2030-01-02T05:00:00.000+00:00"


def test_properties_without_due_or_delay() -> None:
    properties = Envelope(TASK_ID, "t", 0).properties("low")
    assert properties.headers == {HEADER_ATTEMPT: 0, HEADER_QUEUE: "low"}


def test_body_of_an_attempt_beyond_64_bits_round_trips_to_a_refusal() -> None:
    forged = Envelope(TASK_ID, "mail.send", 2**70).body()
    assert (
        forged
        == json.dumps(
            {"id": str(TASK_ID), "type": "mail.send", "attempt": 2**70}, separators=(",", ":")
        ).encode()
    )
    with pytest.raises(InvalidEnvelope, match="'attempt' is larger"):
        Envelope.parse(forged)
