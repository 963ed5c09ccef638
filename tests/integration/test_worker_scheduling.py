"""Priorities and delays end to end: critical drains first while low still progresses;
a short delay published after a long one is not blocked behind it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from taskq.amqp.envelope import Envelope
from taskq.settings import Settings
from taskq.worker.consumer import Buffers, Delivery, weights
from tests.support.worker_fixtures import harness, running_worker

pytestmark = pytest.mark.integration


class _OpenChannel:
    is_closed = False


def test_weights_halve_down_the_priority_list() -> None:
    assert weights(["critical", "high", "default", "low"]) == {
        "critical": 8,
        "high": 4,
        "default": 2,
        "low": 1,
    }


def test_buffers_share_slots_by_weight_and_skip_empty_queues() -> None:
    buffers = Buffers(["critical", "high", "default", "low"])
    for queue in ("critical", "low"):
        for n in range(30):
            envelope = Envelope(uuid.uuid4(), "demo.noop", 0)
            buffers.put(Delivery(envelope, queue, _OpenChannel(), n))  # type: ignore[arg-type]
    taken = [d.queue for d in buffers.take(18)]
    # 8:1 between the two non-empty queues, interleaved rather than in a block.
    assert taken.count("critical") == 16 and taken.count("low") == 2
    assert taken.index("low") < 9
    rest = buffers.take(100)
    assert len(rest) == 42 and len(buffers) == 0
    assert [d.tag for d in rest if d.queue == "low"] == list(range(2, 30))  # FIFO per queue


async def test_critical_drains_first_and_low_still_progresses(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.noop", max_attempts=1)
        low = [await h.enqueue("demo.noop", queue="low") for _ in range(40)]
        critical = [await h.enqueue("demo.noop", queue="critical") for _ in range(40)]
        # One worker running one task at a time over a backlog in both queues.
        async with running_worker(settings, concurrency=1, prefetch=20):
            for task_id in [*low, *critical]:
                await h.wait_for(task_id, "SUCCEEDED", timeout=60)
        rows = await h.store.pool.fetch(
            "SELECT queue, started_at FROM tasks WHERE id = ANY($1) ORDER BY started_at",
            [*low, *critical],
        )
    order = [row["queue"] for row in rows]
    last_critical = max(i for i, queue in enumerate(order) if queue == "critical")
    low_before = order[:last_critical].count("low")
    # Critical drained first: by its last start only a small share of low had run ...
    assert low_before <= 15, order
    # ... but low was not starved while critical had a backlog.
    assert low_before >= 2, order
    assert order[-1] == "low"


async def test_a_short_delay_is_not_blocked_by_a_long_one(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings):
        long_id = await h.enqueue("demo.echo", {"task": "A"}, delay=20)
        short_id = await h.enqueue("demo.echo", {"task": "B"}, delay=2)
        short = await h.wait_for(short_id, "SUCCEEDED", timeout=10)
        assert (await h.task(long_id)).status == "ENQUEUED"
        long = await h.wait_for(long_id, "SUCCEEDED", timeout=30)
    for row, delay in ((short, 2), (long, 20)):
        assert row.started_at is not None
        waited = row.started_at - row.created_at
        assert timedelta(seconds=delay) <= waited < timedelta(seconds=delay + 1.5), (delay, waited)
