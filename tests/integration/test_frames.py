"""Batched publishes on a real RabbitMQ: one write, every message confirmed or failed on its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import aiormq
import pytest
from pamqp.commands import Basic

from taskq.amqp import frames
from taskq.amqp.frames import Outgoing, publish_batch

pytestmark = pytest.mark.integration


@dataclass
class Route:
    channel: aiormq.abc.AbstractChannel
    exchange: str
    queue: str
    reader: aio_pika.abc.AbstractChannel


@pytest.fixture
async def route(amqp_url: str) -> AsyncIterator[Route]:
    """A direct exchange bound to one queue, and a confirm-mode channel to publish on."""
    connection = await aio_pika.connect(amqp_url)
    name = f"test-frames-{uuid.uuid4().hex[:8]}"
    reader = await connection.channel()
    exchange = await reader.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
    queue = await reader.declare_queue(name, exclusive=True)
    await queue.bind(exchange, routing_key="bound")
    publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        yield Route(await publishing.get_underlay_channel(), name, name, reader)
    finally:
        await connection.close()


def message(route: Route, n: int, routing_key: str = "bound", body: bytes = b"") -> Outgoing:
    properties = Basic.Properties(message_id=f"m{n}", delivery_mode=2, headers={"n": n})
    return Outgoing(route.exchange, routing_key, body or b"%d" % n, properties)


async def received(route: Route, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    queue = await route.reader.get_queue(route.queue, ensure=False)
    messages = []
    for _ in range(200):
        while (got := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(got)
        if len(messages) >= count:
            break
        await asyncio.sleep(0.02)
    return messages


async def test_a_batch_is_confirmed_and_arrives_whole_and_in_order(route: Route) -> None:
    batch = [message(route, n) for n in range(300)]
    assert await publish_batch(route.channel, batch, timeout=10) == [None] * 300
    got = await received(route, 300)
    assert [m.body for m in got] == [b"%d" % n for n in range(300)]
    assert [m.message_id for m in got] == [f"m{n}" for n in range(300)]
    assert [m.headers["n"] for m in got] == list(range(300))
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in got)


async def test_an_unroutable_message_fails_alone(route: Route) -> None:
    batch = [message(route, 0), message(route, 1, routing_key="nowhere"), message(route, 2)]
    results = await publish_batch(route.channel, batch, timeout=10)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], aiormq.exceptions.PublishError)
    assert [m.body for m in await received(route, 2)] == [b"0", b"2"]


async def test_concurrent_batches_each_get_their_own_confirms(route: Route) -> None:
    batches = [[message(route, b * 100 + n) for n in range(40)] for b in range(10)]
    results = await asyncio.gather(*(publish_batch(route.channel, b, timeout=10) for b in batches))
    assert results == [[None] * 40] * 10
    assert len(await received(route, 400)) == 400


async def test_the_same_message_id_twice_in_a_batch_is_confirmed_twice(route: Route) -> None:
    twice = [message(route, 7), message(route, 7)]
    assert await publish_batch(route.channel, twice, timeout=10) == [None, None]
    assert [m.body for m in await received(route, 2)] == [b"7", b"7"]


async def test_a_body_beyond_one_frame_goes_through_aiormqs_own_publish(route: Route) -> None:
    large = b"x" * 20_000
    batch = [message(route, 0), message(route, 1, body=large)]
    assert not frames._supported(route.channel, batch)
    assert await publish_batch(route.channel, batch, timeout=10) == [None, None]
    assert [len(m.body) for m in await received(route, 2)] == [1, 20_000]


async def test_a_closed_channel_fails_every_message_at_once(route: Route) -> None:
    await route.channel.close()
    results = await asyncio.wait_for(
        publish_batch(route.channel, [message(route, n) for n in range(3)], timeout=10), 5
    )
    assert all(isinstance(r, Exception) for r in results)


async def test_an_empty_batch_publishes_nothing(route: Route) -> None:
    assert await publish_batch(route.channel, [], timeout=10) == []
