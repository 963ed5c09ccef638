"""Delayed and immediate publishes against the real broker.

Each test declares the whole topology (default 30-day maximum, 22 levels) in a
namespace of its own with ``taskq.amqp.broker.declare`` and publishes with
``taskq.amqp.broker.Publisher``, the way the API and the worker do.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from taskq.amqp import broker
from taskq.amqp.broker import Publisher
from taskq.amqp.envelope import HEADER_ATTEMPT, HEADER_DELAY, HEADER_DUE, HEADER_QUEUE, Envelope
from taskq.amqp.topology import Topology, plan
from taskq.errors import DelayTooLong, PublishError
from taskq.settings import Settings
from tests.support.services import delete_namespace, make_settings

# RabbitMQ's TTL timers run on the Erlang VM's monotonic clock, which, while it
# corrects itself to a system clock being adjusted (NTP), may run up to 1% fast
# (time correction: measured here at about 0.5% late in a long session). So the
# broker alone may deliver a 2 s delay 10 ms early by this process's clock. A
# task still never starts early: the claim compares run_at with Postgres's clock
# and sends an early delivery back for the rest of its delay
# (test_worker_scheduling checks that through a worker).
BROKER_CLOCK = 0.99

pytestmark = pytest.mark.integration


@dataclass
class Declared:
    settings: Settings
    topology: Topology
    connection: AbstractConnection
    publisher: Publisher


async def declare(settings: Settings) -> Declared:
    connection = await broker.connect(
        settings.amqp_url, name=f"taskq-test-{settings.namespace}", robust=False
    )
    topology = settings.topology()
    report = await broker.declare(connection, topology)
    assert report.changed
    return Declared(
        settings, topology, connection, Publisher(connection, topology, settings.max_delay)
    )


async def close(declared: Declared) -> None:
    await declared.publisher.close()
    await declared.connection.close()


@pytest.fixture
async def rmq(amqp_settings: Settings) -> AsyncIterator[Declared]:
    declared = await declare(amqp_settings)
    yield declared
    await close(declared)


class Inbox:
    """Consumes one queue, recording when each message arrived (``time.monotonic``)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, AbstractIncomingMessage]] = []
        self.changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.arrivals.append((time.monotonic(), message))
        await message.ack()
        self.changed.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.arrivals) < count:
                self.changed.clear()
                await self.changed.wait()

    def by_id(self) -> dict[str, tuple[float, AbstractIncomingMessage]]:
        return {str(message.message_id): (at, message) for at, message in self.arrivals}


async def consume(declared: Declared, queue: str) -> Inbox:
    inbox = Inbox()
    channel = await declared.connection.channel()
    work_queue = await channel.get_queue(declared.topology.names.queue(queue), ensure=False)
    await work_queue.consume(inbox.on_message)
    return inbox


async def message_counts(declared: Declared) -> dict[str, int]:
    """How many messages each queue of the namespace holds."""
    channel = await declared.connection.channel()
    try:
        counts = {}
        for queue in declared.topology.queues:
            declared_queue = await channel.declare_queue(queue.name, passive=True)
            result = declared_queue.declaration_result
            counts[queue.name] = result.message_count or 0
        return counts
    finally:
        await channel.close()


def envelope(task_type: str = "test.delay") -> Envelope:
    return Envelope(uuid.uuid4(), task_type, 1)


def death_queues(message: AbstractIncomingMessage) -> set[str]:
    deaths: Any = message.headers.get("x-death") or []
    return {str(death["queue"]) for death in deaths}


# -- the delay levels, timed --------------------------------------------------------------------


async def publish_timed(declared: Declared, delays: list[int]) -> dict[int, tuple[float, str]]:
    """Publish one envelope per delay, in order; when each publish began, and its task id."""
    sent = {}
    for delay in delays:
        env = envelope()
        started = time.monotonic()
        await declared.publisher.publish(env, "default", delay=delay)
        sent[delay] = (started, str(env.id))
    return sent


async def check_delays(declared: Declared) -> None:
    ns = declared.settings.namespace
    inbox = await consume(declared, "default")
    # The scenario: 8 s first, then 2 s, to the same work queue; and a
    # 5 s one (binary 101: two levels) that must land between them.
    sent = await publish_timed(declared, [8, 2, 5])
    await inbox.wait_for(3, timeout=12)
    arrived = inbox.by_id()
    kind = declared.settings.queue_type

    order = [str(message.message_id) for _, message in inbox.arrivals]
    assert order == [sent[2][1], sent[5][1], sent[8][1]], kind

    for delay, low, high in [(2, 2.0, 3.5), (5, 5.0, 6.5), (8, 8.0, 9.5)]:
        started, task_id = sent[delay]
        at, message = arrived[task_id]
        waited = at - started
        assert low * BROKER_CLOCK <= waited <= high, (kind, delay, waited)
        assert message.headers[HEADER_DELAY] == delay
    # The real broker sent each one through exactly the levels its bits name.
    assert death_queues(arrived[sent[2][1]][1]) == {f"{ns}.delay.01"}
    assert death_queues(arrived[sent[5][1]][1]) == {f"{ns}.delay.02", f"{ns}.delay.00"}
    assert death_queues(arrived[sent[8][1]][1]) == {f"{ns}.delay.03"}


async def test_short_delay_overtakes_long_delay(amqp_url: str, namespace: str) -> None:
    """Both queue types at once: the 2 s envelope arrives first, each on time."""
    all_settings = [
        make_settings(amqp_url=amqp_url, namespace=f"{namespace}q", queue_type="quorum"),
        make_settings(amqp_url=amqp_url, namespace=f"{namespace}c", queue_type="classic"),
    ]
    results = await asyncio.gather(*(declare(s) for s in all_settings), return_exceptions=True)
    declared = [r for r in results if isinstance(r, Declared)]
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        await asyncio.gather(*(check_delays(d) for d in declared))
    finally:
        for d in declared:
            await close(d)
        for settings in all_settings:
            await delete_namespace(settings)


async def test_fractional_delay_rounds_up_never_early(rmq: Declared) -> None:
    inbox = await consume(rmq, "default")
    started = time.monotonic()
    await rmq.publisher.publish(envelope(), "default", delay=0.2)
    await inbox.wait_for(1, timeout=5)
    ((at, message),) = inbox.arrivals
    assert 1.0 * BROKER_CLOCK <= at - started <= 2.5
    assert message.headers[HEADER_DELAY] == 1


# -- immediate publishes and message properties -------------------------------------------------


async def test_undelayed_publish_goes_straight_to_the_work_queue(rmq: Declared) -> None:
    inbox = await consume(rmq, "default")
    env = Envelope(uuid.uuid4(), "mail.send", 3)
    before = datetime.now(UTC)
    started = time.monotonic()
    await rmq.publisher.publish(env, "default", headers={"x-extra": "kept"})
    await inbox.wait_for(1, timeout=2)
    ((at, message),) = inbox.arrivals
    assert at - started < 1.0

    assert Envelope.parse(message.body) == env
    assert message.message_id == str(env.id)
    assert message.type == "mail.send"
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.routing_key == "default"
    assert message.exchange == rmq.topology.names.direct
    headers = message.headers
    assert headers[HEADER_ATTEMPT] == 3
    assert headers[HEADER_QUEUE] == "default"
    due = datetime.fromisoformat(str(headers[HEADER_DUE]))
    assert before - timedelta(seconds=1) <= due <= datetime.now(UTC) + timedelta(seconds=1)
    assert HEADER_DELAY not in headers
    assert headers["x-extra"] == "kept"
    assert "x-death" not in headers


async def test_delayed_message_carries_its_due_time(rmq: Declared) -> None:
    inbox = await consume(rmq, "default")
    before = datetime.now(UTC)
    await rmq.publisher.publish(envelope(), "default", delay=1)
    await inbox.wait_for(1, timeout=5)
    ((_, message),) = inbox.arrivals
    due = datetime.fromisoformat(str(message.headers[HEADER_DUE]))
    assert before + timedelta(seconds=1) - timedelta(milliseconds=5) <= due
    assert due <= before + timedelta(seconds=2)
    assert message.headers[HEADER_QUEUE] == "default"
    assert message.type == "test.delay"
    assert message.delivery_mode == 2


async def test_each_work_queue_gets_its_own_envelopes(rmq: Declared) -> None:
    inboxes = {queue: await consume(rmq, queue) for queue in rmq.settings.queues}
    sent = {}
    for queue in rmq.settings.queues:
        env = envelope()
        await rmq.publisher.publish(env, queue, delay=1)
        sent[queue] = str(env.id)
    for queue, inbox in inboxes.items():
        await inbox.wait_for(1, timeout=5)
        assert [str(m.message_id) for _, m in inbox.arrivals] == [sent[queue]]


# -- refusals -----------------------------------------------------------------------------------


async def test_delay_over_the_maximum_is_refused_without_publishing(rmq: Declared) -> None:
    max_delay = rmq.settings.max_delay
    with pytest.raises(DelayTooLong):
        await rmq.publisher.publish(envelope(), "default", delay=max_delay + 1)
    with pytest.raises(DelayTooLong):
        await rmq.publisher.publish(envelope(), "default", delay=max_delay + 0.5)
    # A publisher configured with a lower maximum than the levels can spell.
    strict = Publisher(rmq.connection, rmq.topology, max_delay=60)
    try:
        with pytest.raises(DelayTooLong):
            await strict.publish(envelope(), "default", delay=61)
    finally:
        await strict.close()
    assert set((await message_counts(rmq)).values()) == {0}


async def test_the_maximum_delay_is_accepted_and_waits_in_the_top_level(rmq: Declared) -> None:
    max_delay = rmq.settings.max_delay
    assert max_delay == 30 * 86400
    await rmq.publisher.publish(envelope(), "default", delay=max_delay)
    # 30 days is 1001111000110100000000000 in binary: the first hop is level 21.
    counts = await message_counts(rmq)
    top = rmq.topology.names.delay(21)
    assert counts.pop(top) == 1
    assert set(counts.values()) == {0}


async def test_unknown_work_queue_is_unroutable(rmq: Declared) -> None:
    # A publisher that believes in a queue the broker does not have: the broker
    # returns the mandatory publish, and that is a failure, not a silent drop.
    believes = plan(
        rmq.settings.namespace,
        [*rmq.settings.queues, "ghost"],
        queue_type=rmq.settings.queue_type,
        max_delay=rmq.settings.max_delay,
    )
    ghost = Publisher(rmq.connection, believes, rmq.settings.max_delay)
    try:
        with pytest.raises(PublishError, match="unroutable"):
            await asyncio.wait_for(ghost.publish(envelope(), "ghost"), 5)
        with pytest.raises(PublishError, match="no work queue"):
            await rmq.publisher.publish(envelope(), "nosuch")
    finally:
        await ghost.close()
    # The publisher is still usable afterwards.
    await rmq.publisher.publish(envelope(), "default")
    counts = await message_counts(rmq)
    assert counts[rmq.topology.names.queue("default")] == 1


async def test_delayed_publish_to_unknown_work_queue_is_refused(rmq: Declared) -> None:
    with pytest.raises((PublishError, ValueError)):
        await asyncio.wait_for(rmq.publisher.publish(envelope(), "nosuch", delay=1), 5)


async def test_publish_after_the_exchanges_are_gone_fails_fast(rmq: Declared) -> None:
    await rmq.publisher.publish(envelope(), "default")
    channel = await rmq.connection.channel()
    for exchange in rmq.topology.exchanges:
        await channel.exchange_delete(exchange.name)
    await channel.close()

    for delay in (0, 3, 0):
        started = time.monotonic()
        with pytest.raises(PublishError, match="NOT_FOUND"):
            await asyncio.wait_for(rmq.publisher.publish(envelope(), "default", delay=delay), 5)
        assert time.monotonic() - started < 2

    # Once the topology is back, the same publisher works again.
    report = await broker.declare(rmq.connection, rmq.topology)
    assert report.created == [f"exchange {e.name}" for e in rmq.topology.exchanges]
    await rmq.publisher.publish(envelope(), "default")
