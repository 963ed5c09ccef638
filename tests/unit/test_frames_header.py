"""taskq.amqp.frames.content_header writes exactly the content header frame pamqp writes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from taskq.amqp.envelope import Envelope
from taskq.amqp.frames import Persistent, content_header


def pamqp_header(channel: int, body_size: int, properties: Basic.Properties) -> bytes:
    return pamqp.frame.marshal(ContentHeader(0, body_size, properties), channel)


def test_an_envelope_header_is_pamqps() -> None:
    envelope = Envelope(uuid.uuid4(), "demo.noop", 3)
    due = datetime.now(UTC) + timedelta(seconds=30)
    for properties in (
        envelope.properties("default"),
        envelope.properties("high", due=due, delay=30, headers={"x-taskq-error": "boom"}),
    ):
        assert content_header(7, 61, properties) == pamqp_header(7, 61, properties)


def test_true_and_one_are_told_apart_in_headers() -> None:
    # Equal and hash-equal in Python, but a boolean and an integer on the wire.
    as_int = Basic.Properties(message_id="m", headers={"x": 1})
    as_bool = Basic.Properties(message_id="m", headers={"x": True})
    assert content_header(1, 0, as_int) == pamqp_header(1, 0, as_int)
    assert content_header(1, 0, as_bool) == pamqp_header(1, 0, as_bool)
    assert content_header(1, 0, as_int) != content_header(1, 0, as_bool)


@pytest.mark.parametrize(
    "properties",
    [
        Basic.Properties(),
        Basic.Properties(content_type="", message_id="m"),  # '' is left out, as by pamqp
        Basic.Properties(delivery_mode=1, priority=0),
        Basic.Properties(delivery_mode=2, priority=255),
        Basic.Properties(timestamp=datetime(2026, 12, 1, 12, 0, 0, 999_999)),  # naive: UTC
        Basic.Properties(timestamp=datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)),
        Basic.Properties(timestamp=datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5)))),
        Basic.Properties(headers={"nested": {"a": [1, "b"]}, "when": datetime(2026, 1, 1)}),
        Basic.Properties(headers={}),
        Basic.Properties(message_type="é" * 127),  # 254 bytes
    ],
)
def test_edge_cases_are_pamqps(properties: Basic.Properties) -> None:
    assert content_header(65535, 2**40, properties) == pamqp_header(65535, 2**40, properties)


@pytest.mark.parametrize(
    "properties",
    [
        Basic.Properties(message_type="x" * 256),
        Basic.Properties(priority=256),
        Basic.Properties(priority=-1),
    ],
)
def test_what_no_frame_can_carry_raises_as_in_pamqp(properties: Basic.Properties) -> None:
    with pytest.raises(Exception) as ours:
        content_header(1, 0, properties)
    with pytest.raises(Exception) as theirs:
        pamqp_header(1, 0, properties)
    assert type(ours.value) is type(theirs.value)


short_strings = st.none() | st.text(max_size=40)
header_values: st.SearchStrategy[Any] = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=20)
    | st.none()
)
properties = st.builds(
    Basic.Properties,
    content_type=short_strings,
    content_encoding=short_strings,
    headers=st.none()
    | st.dictionaries(st.text(min_size=1, max_size=10), header_values, max_size=4),
    delivery_mode=st.sampled_from([None, 1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=short_strings,
    reply_to=short_strings,
    expiration=short_strings,
    message_id=short_strings,
    timestamp=st.none()
    | st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    message_type=short_strings,
    user_id=short_strings,
    app_id=short_strings,
)


@given(properties, st.integers(0, 65535), st.integers(0, 2**64 - 1))
def test_any_properties_are_pamqps(
    properties: Basic.Properties, channel: int, body_size: int
) -> None:
    assert content_header(channel, body_size, properties) == pamqp_header(
        channel, body_size, properties
    )


persistent = st.builds(
    Persistent,
    message_id=st.text(max_size=130),  # up to 520 bytes: past a short string's 255
    message_type=st.text(max_size=130),
    timestamp=st.integers(0, 253_402_300_799),  # to 9999-12-31, what a datetime holds
    headers=st.dictionaries(st.text(min_size=1, max_size=10), header_values, max_size=4)
    | st.just({"nested": {"a": [1]}}),
)


@given(persistent, st.integers(0, 65535), st.integers(0, 2**64 - 1))
def test_persistent_properties_are_pamqps(
    properties: Persistent, channel: int, body_size: int
) -> None:
    # Written without pamqp where it can, by pamqp where it must (an empty string, which
    # pamqp leaves out; one too long, which it refuses): the bytes or the error are pamqp's.
    try:
        expected = pamqp_header(channel, body_size, properties.pamqp())
    except Exception as exc:
        with pytest.raises(type(exc)):
            content_header(channel, body_size, properties)
    else:
        assert content_header(channel, body_size, properties) == expected


def test_an_envelope_as_persistent_is_its_properties() -> None:
    envelope = Envelope(uuid.uuid4(), "demo.noop", 3)
    due = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    due_ms = int(due.timestamp() * 1000)
    for fast, slow in (
        (envelope.persistent("high"), envelope.properties("high")),
        (
            envelope.persistent("high", due_ms=due_ms, delay=30, headers={"x-taskq-error": "e"}),
            envelope.properties("high", due=due, delay=30, headers={"x-taskq-error": "e"}),
        ),
    ):
        assert fast.pamqp().headers == slow.headers
        slow.timestamp = datetime.fromtimestamp(fast.timestamp, UTC)  # the same second
        assert content_header(7, 61, fast) == pamqp_header(7, 61, slow)
