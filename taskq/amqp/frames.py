"""A batch of publishes written to an aiormq channel in one write, confirms awaited together.

aiormq's ``basic_publish`` pays for every message on its own: a lock, a timeout,
a hand-off through the writer task's queue and a drain, each with its futures.
That was a large share of a publishing process's CPU (figures: docs/benchmark.md).
:func:`publish_batch` writes a whole batch as one buffer, under the
channel's own publish lock, and registers each message's confirm exactly as
``basic_publish`` does, so that aiormq resolves them unchanged: acks (single or
``multiple``), nacks, returns of unroutable messages (matched by message id) and
a channel or connection that closes (which rejects every pending future).
Each message's content header is encoded by :func:`content_header`, which
writes pamqp's bytes in a fraction of pamqp's time (docs/benchmark.md).
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiormq
import pamqp.encode
import pamqp.frame
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

# What publish_batch uses of an aiormq channel besides its public methods; a
# channel without all of them (another aiormq) is published to one message at a time.
_INTERNALS = ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue")
# The smallest frame size AMQP allows a broker to negotiate, less the frame's own 8 bytes:
# a body up to this size always fits one body frame.
_ONE_FRAME_BODY = 4096 - 8


JSON = "application/json"
PERSISTENT = 2  # AMQP delivery mode: written to disk by the broker


class Persistent(NamedTuple):
    """The properties of a persistent JSON message: message id, type, timestamp (whole
    seconds since the epoch) and headers; :func:`content_header` writes them as pamqp
    writes the same :class:`Basic.Properties` (:meth:`pamqp`), without building those.

    Building and walking a ``Basic.Properties`` cost as much as the rest of an
    envelope's publish: an envelope's properties are always these few.
    """

    message_id: str
    message_type: str
    timestamp: int
    headers: dict[str, Any]

    def pamqp(self) -> Basic.Properties:
        return Basic.Properties(
            message_id=self.message_id,
            message_type=self.message_type,
            content_type=JSON,
            delivery_mode=PERSISTENT,
            timestamp=datetime.fromtimestamp(self.timestamp, UTC),
            headers=self.headers,
        )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish (mandatory: an unroutable one is returned, hence failed)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties | Persistent


async def publish_batch(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[Outgoing], timeout: float
) -> list[BaseException | None]:
    """Publish ``messages`` on ``channel`` (in confirm mode) and wait for their confirms.

    Returns one entry per message: ``None`` if the broker acked it, else the
    error (aiormq's ``PublishError`` for a return, ``DeliveryError`` for a nack,
    ``TimeoutError`` if no confirm came within ``timeout`` seconds, or the error
    that closed the channel). Never raises for a single message's failure.
    """
    if not messages:
        return []
    if not _supported(channel, messages):
        return await _one_by_one(channel, messages, timeout)
    confirms: list[asyncio.Future[Any]] = []
    try:
        async with asyncio.timeout(timeout):
            await _write(channel, messages, confirms)
    except Exception as exc:
        for confirm in confirms:
            confirm.cancel()  # aiormq ignores a confirm that comes after this
        return [exc] * len(messages)
    # The broker confirms a channel's publishes in order, as a rule: the last one's
    # confirm usually finds the others resolved, and a wait on it alone spares a
    # callback on every other confirm.
    deadline = asyncio.get_running_loop().time() + timeout
    await asyncio.wait(confirms[-1:], timeout=timeout)
    pending = [confirm for confirm in confirms if not confirm.done()]
    if pending:
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        _, still = await asyncio.wait(pending, timeout=left)
        for confirm in still:
            confirm.cancel()
    return [_outcome(confirm, timeout) for confirm in confirms]


def _outcome(confirm: asyncio.Future[Any], timeout: float) -> BaseException | None:
    if confirm.cancelled():
        return TimeoutError(f"no confirm within {timeout:g}s")
    return confirm.exception() or _confirmed(confirm.result())


def _confirmed(frame: Any) -> BaseException | None:
    """None for an ack; a nack (or anything else) is a failed publish."""
    return None if isinstance(frame, Basic.Ack) else aiormq.exceptions.DeliveryError(None, frame)


async def _write(
    channel: aiormq.abc.AbstractChannel,
    messages: Sequence[Outgoing],
    confirms: list[asyncio.Future[Any]],
) -> None:
    """Register a confirm per message (into ``confirms``) and write all their frames."""
    ch: Any = channel
    number = ch.number
    parts: list[bytes] = []
    async with ch.lock:  # delivery tags are numbered in the order frames are written
        if ch.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
        for message in messages:
            ch.delivery_tag += 1
            tag = ch.delivery_tag
            confirm = ch.create_future()
            ch.confirmations[tag] = confirm
            message_id = str(message.properties.message_id)  # set: see _supported
            ch.message_id_delivery_tag[message_id] = tag
            confirm.add_done_callback(functools.partial(_forget, ch, message_id, tag))
            confirms.append(confirm)
            parts.append(_method(number, message.exchange, message.routing_key))
            parts.append(content_header(number, len(message.body), message.properties))
            parts.append(_BODY_START.pack(_FRAME_BODY, number, len(message.body)))
            parts.append(message.body)
            parts.append(_FRAME_END)
        drained = ch.create_future()
        await ch.write_queue.put(
            ChannelFrame(payload=b"".join(parts), should_close=False, drain_future=drained)
        )
    await drained


def _forget(channel: Any, message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
    """Drop the message id's entry once its confirm resolved (as ``basic_publish`` does)."""
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id)


@functools.lru_cache(maxsize=1024)
def _method(channel_number: int, exchange: str, routing_key: str) -> bytes:
    """The marshalled ``basic.publish`` frame; the same for every envelope of a route."""
    method = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    return pamqp.frame.marshal(method, channel_number)


# A content header frame: frame type, channel, payload size; then the payload's
# class id, weight (always 0) and body size, and the property flags.
_HEADER_START = struct.Struct(">BHIHHQH")
_FRAME_HEADER = 2
_FRAME_END = b"\xce"
# A body frame: frame type, channel, payload size; then the body and the frame end
# (what pamqp.frame.marshal writes for a ContentBody).
_BODY_START = struct.Struct(">BHI")
_FRAME_BODY = 3
_SHORT_STRING = struct.Struct(">B")
_OCTET = struct.Struct(">B")
_TIMESTAMP = struct.Struct(">Q")


def content_header(
    channel_number: int, body_size: int, properties: Basic.Properties | Persistent
) -> bytes:
    """The marshalled content header frame of a message: the bytes pamqp writes.

    pamqp dispatches every property through its generic type encoders, which
    made the header a noticeable share of a publishing process's CPU (figures:
    docs/benchmark.md). This encodes each
    property by its known AMQP type, reuses the encoding of a headers table
    seen before (an envelope's table holds its queue, attempt and due time to
    the millisecond, so under load the envelopes of one millisecond share
    it), and leaves
    to pamqp whatever it cannot encode the same way (it raises for what no
    frame can carry, e.g. a short string over 255 bytes).
    """
    if isinstance(properties, Persistent):
        payload = _persistent(properties)
        if payload is None:
            return content_header(channel_number, body_size, properties.pamqp())
        start = _HEADER_START.pack(
            _FRAME_HEADER, channel_number, 14 + len(payload), Basic.frame_id, 0, body_size,
            _PERSISTENT_FLAGS,
        )  # fmt: skip
        return start + payload + _FRAME_END
    flags = 0
    parts = []
    for name, flag, encode in _PROPERTIES:
        value = getattr(properties, name)
        if value is None or value == "":
            continue
        encoded = encode(value)
        if encoded is None:
            header = ContentHeader(0, body_size, properties)
            return pamqp.frame.marshal(header, channel_number)
        flags |= flag
        parts.append(encoded)
    payload = b"".join(parts)
    start = _HEADER_START.pack(
        _FRAME_HEADER, channel_number, 14 + len(payload), Basic.frame_id, 0, body_size, flags
    )
    return start + payload + _FRAME_END


def _short_string(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    data = value.encode()
    return _SHORT_STRING.pack(len(data)) + data if len(data) <= 255 else None


def _octet(value: Any) -> bytes | None:
    return _OCTET.pack(value) if type(value) is int and 0 <= value <= 255 else None


def _timestamp(value: Any) -> bytes | None:
    # Whole seconds since the epoch, truncated as pamqp does (a naive datetime,
    # which pamqp takes for UTC, is left to pamqp).
    if not isinstance(value, datetime) or value.utcoffset() is None:
        return None
    return _TIMESTAMP.pack(int(value.timestamp()))


def _table(value: Any) -> bytes | None:
    if not isinstance(value, dict):
        return None
    # The key carries each value's type: True == 1, but pamqp encodes them differently.
    try:
        key = tuple((k, v, type(v)) for k, v in value.items())
        return _cached_table(key)
    except TypeError:  # an unhashable value (a nested table or array): not cached
        return pamqp.encode.field_table(value)


@functools.lru_cache(maxsize=1024)
def _cached_table(key: tuple[tuple[str, Any, type], ...]) -> bytes:
    return pamqp.encode.field_table({k: v for k, v, _ in key})


# Basic.Properties in wire order: the attribute, its flag bit and its encoder
# (None from an encoder: let pamqp marshal the whole header).
_PROPERTIES: tuple[tuple[str, int, Callable[[Any], bytes | None]], ...] = tuple(
    (name, Basic.Properties.flags[name], encode)
    for name, encode in (
        ("content_type", _short_string),
        ("content_encoding", _short_string),
        ("headers", _table),
        ("delivery_mode", _octet),
        ("priority", _octet),
        ("correlation_id", _short_string),
        ("reply_to", _short_string),
        ("expiration", _short_string),
        ("message_id", _short_string),
        ("timestamp", _timestamp),
        ("message_type", _short_string),
        ("user_id", _short_string),
        ("app_id", _short_string),
        ("cluster_id", _short_string),
    )
)


# The properties a Persistent sets, in wire order (content type, headers, delivery
# mode, message id, timestamp, type).
_PERSISTENT_FLAGS = sum(
    Basic.Properties.flags[name]
    for name in (
        "content_type", "headers", "delivery_mode", "message_id", "timestamp", "message_type",
    )
)  # fmt: skip
_JSON_BYTES = _SHORT_STRING.pack(len(JSON)) + JSON.encode()
_PERSISTENT_BYTES = _OCTET.pack(PERSISTENT)


def _persistent(properties: Persistent) -> bytes | None:
    """The property list of a :class:`Persistent`; None where pamqp must have its say
    (an empty or too long string, which pamqp leaves out or refuses)."""
    message_id = _short_string(properties.message_id)
    message_type = _short_string(properties.message_type)
    table = _table(properties.headers)
    if not (properties.message_id and properties.message_type and message_id and message_type):
        return None
    if table is None or not 0 <= properties.timestamp < 2**64:
        return None
    timestamp = _TIMESTAMP.pack(properties.timestamp)
    return _JSON_BYTES + table + _PERSISTENT_BYTES + message_id + timestamp + message_type


def _supported(channel: aiormq.abc.AbstractChannel, messages: Sequence[Outgoing]) -> bool:
    return (
        all(hasattr(channel, name) for name in _INTERNALS)
        and getattr(channel, "publisher_confirms", False)
        and all(len(m.body) <= _ONE_FRAME_BODY and m.properties.message_id for m in messages)
    )


async def _one_by_one(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[Outgoing], timeout: float
) -> list[BaseException | None]:
    """The same through aiormq's public ``basic_publish``, all in flight at once."""
    results = await asyncio.gather(
        *(
            channel.basic_publish(
                m.body,
                exchange=m.exchange,
                routing_key=m.routing_key,
                properties=m.properties.pamqp()
                if isinstance(m.properties, Persistent)
                else m.properties,
                mandatory=True,
                timeout=timeout,
            )
            for m in messages
        ),
        return_exceptions=True,
    )
    return [r if isinstance(r, BaseException) else _confirmed(r) for r in results]
