"""Poison never blocks: garbage and unknown ids go to the DLQ, and a worker keeps consuming
after the broker cancels its consumer or drops its connection."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from taskq.amqp import broker
from taskq.amqp.envelope import Envelope
from taskq.fleet.relay import HEADER_ORIGIN, HEADER_REASON
from taskq.settings import Settings
from tests.support.proxy import proxied
from tests.support.worker_fixtures import harness, metric, running_worker

pytestmark = pytest.mark.integration


async def test_garbage_is_dead_lettered_and_the_next_task_runs(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings) as worker:
        await h.publish_raw("default", b"\x00\xff not an envelope")
        await h.publish_raw("default", b'{"id": "not-a-uuid", "type": "demo.echo", "attempt": 0}')
        task_id = await h.enqueue("demo.echo", {"after": "garbage"})
        await h.wait_for(task_id, "SUCCEEDED")
        letters = await h.dead_letters(2)
        assert sorted(letter.body for letter in letters) == [
            b"\x00\xff not an envelope",
            b'{"id": "not-a-uuid", "type": "demo.echo", "attempt": 0}',
        ]
        for letter in letters:
            # Rejected by the worker, dead-lettered by the work queue's DLX.
            assert letter.headers["x-first-death-queue"] == h.names.queue("default")
            assert letter.headers["x-first-death-reason"] == "rejected"
        assert metric(worker, "taskq_deliveries_total", queue="default", decision="invalid") == 2


async def test_an_envelope_without_a_task_is_dead_lettered(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings) as worker:
        ghost = uuid.uuid4()
        await h.publisher.publish(Envelope(ghost, "demo.echo", 0), "high")
        [letter] = await h.dead_letters(1)
        assert letter.message_id == str(ghost)
        assert letter.headers[HEADER_REASON] == f"NoTask: no task with id {ghost}"
        assert letter.headers[HEADER_ORIGIN] == "high"
        task_id = await h.enqueue("demo.echo", queue="high")
        await h.wait_for(task_id, "SUCCEEDED")
        assert metric(worker, "taskq_dead_lettered_total", queue="high", reason="missing") == 1


async def test_consuming_resumes_after_the_broker_cancels_the_consumer(
    settings: Settings,
) -> None:
    async with harness(settings) as h, running_worker(settings):
        # Deleting a queue makes the broker cancel its consumers.
        channel = await h.connection.channel()
        await channel.queue_delete(h.names.queue("default"))
        await channel.close()
        await asyncio.sleep(0.5)
        await broker.declare(h.connection, settings.topology())
        task_id = await h.enqueue("demo.echo")
        await h.wait_for(task_id, "SUCCEEDED", timeout=30)


async def test_consuming_resumes_after_the_connection_drops(settings: Settings) -> None:
    proxy, through = await proxied(settings, "broker")
    try:
        async with harness(settings) as h, running_worker(through):
            first = await h.enqueue("demo.echo")
            await h.wait_for(first, "SUCCEEDED")
            await proxy.cut()
            second = await h.enqueue("demo.echo")
            await asyncio.sleep(1.0)
            assert (await h.task(second)).status == "ENQUEUED"
            await proxy.start()  # the same port: the robust connection comes back
            await h.wait_for(second, "SUCCEEDED", timeout=30)
            third = await h.enqueue("demo.fail", {"times": 0})
            await h.wait_for(third, "SUCCEEDED")
    finally:
        await proxy.cut()
