"""The relay never stalls behind rows it can never publish: a failing row is set aside with
its reason and retried now and then; a failing broker stops the pass and sets nothing aside."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from taskq.amqp.broker import Link, Publisher
from taskq.errors import DelayTooLong, Nacked, PublishError, Unpublishable
from taskq.fleet.relay import SET_ASIDE_RETRY_BATCH, Relay, _fault_of_row
from taskq.metrics import set_aside_counter
from taskq.settings import Settings
from taskq.store import Store
from tests.support.api_fixtures import declare_topology, drain

pytestmark = pytest.mark.integration

# 200 each: a queue not in the topology, a queue deleted from the broker (its
# publishes come back unroutable), a delay beyond the levels (1 h here).
BAD = {"gone": 200, "low": 200, "far": 200}


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    await declare_topology(settings)
    opened = await Store.connect(settings.database_url)
    await opened.register_task_types([("demo.echo", "default", 5, 30.0, None)])
    try:
        yield opened
    finally:
        await opened.close()


async def owed_rows(db: asyncpg.Connection, queue: str, count: int, *, age: int) -> list[uuid.UUID]:
    """``count`` owed tasks of ``queue``, their publish owed for ``age`` seconds."""
    ids = [uuid.uuid4() for _ in range(count)]
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, run_at,"
        " created_at, updated_at)"
        " SELECT id, 'demo.echo', $2::text, '{}', 5, 30,"
        "        CASE WHEN $2::text = 'default' THEN now() + interval '2 hours' ELSE now() END,"
        "        now() - make_interval(secs => $3), now() - make_interval(secs => $3)"
        " FROM unnest($1::uuid[]) AS id",
        ids,
        queue,
        age,
    )
    return ids


async def test_rows_that_cannot_be_published_are_set_aside_and_newer_ones_flow(
    settings: Settings, store: Store, db: asyncpg.Connection
) -> None:
    # Oldest first: 600 rows that can never be published, then one good row.
    gone = await owed_rows(db, "gone", BAD["gone"], age=300)
    low = await owed_rows(db, "low", BAD["low"], age=200)
    far = await owed_rows(db, "default", BAD["far"], age=100)  # due in 2 h: beyond the levels
    [good] = await owed_rows(db, "high", 1, age=10)
    names = settings.topology().names
    connection_link = Link(settings.amqp_url, name="test-set-aside")
    await connection_link.start()
    await connection_link.ready.wait()
    channel = await connection_link.connection().channel()
    await channel.queue_delete(names.queue("low"))  # its publishes come back unroutable
    await channel.close()

    # A broker that fails: the pass stops; rows that depend on it stay owed as they
    # are (rows no broker could take, for a queue not in the topology or a delay
    # too long, are set aside all the same).
    dead = Link("amqp://guest:guest@127.0.0.1:1/", name="test-dead")
    await dead.start()
    registry = CollectorRegistry()
    counter = set_aside_counter(registry)
    publisher = Publisher(dead, settings.topology(), settings.max_delay)
    relay = Relay(store, settings.database_url, publisher, set_aside=counter)
    try:
        assert await relay.pass_once() == 0
    finally:
        await relay.stop()
        await dead.stop()
    aside = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE set_aside_generation IS NOT NULL AND queue <> 'gone'"
        " AND id <> ALL($1::uuid[])",
        far,
    )
    assert aside == 0
    assert await store.unpublished_count() == 601

    publisher = Publisher(connection_link, settings.topology(), settings.max_delay)
    relay = Relay(store, settings.database_url, publisher, set_aside=counter)
    try:
        # The first pass publishes the good row behind them and sets them aside.
        assert await relay.pass_once() == 1
        [message] = await drain(settings, "high", expect=1)
        assert message.message_id == str(good)
        assert (await store.task(good)).published_at is not None
        for ids, reason in ((gone, "no work queue 'gone'"), (low, "unroutable"),
                            (far, "exceeds the maximum")):  # fmt: skip
            rows = await db.fetch(
                "SELECT set_aside_generation = generation AS aside, publish_error,"
                " publish_retry_at > now() + interval '20 seconds' AS later"
                " FROM tasks WHERE id = ANY($1::uuid[])",
                ids,
            )
            assert all(row["aside"] and row["later"] for row in rows), reason
            assert all(reason in row["publish_error"] for row in rows), rows[0]["publish_error"]
        task = await store.task(gone[0])
        assert task is not None and task.publish_error is not None
        assert "no work queue 'gone'" in task.publish_error
        assert task.publish_retry_at is not None
        assert await store.unpublished_count() == 600
        samples = {
            (s.labels["queue"], s.labels["reason"]): s.value
            for metric in registry.collect()
            for s in metric.samples
            if s.name == "taskq_publishes_set_aside_total"
        }
        assert samples == {
            ("gone", "unroutable"): 200,
            ("low", "unroutable"): 200,
            ("default", "delay_too_long"): 200,
        }

        # Not retried before their time; a row enqueued now still flows.
        [newer] = await owed_rows(db, "high", 1, age=10)
        assert await relay.pass_once() == 1

        # The deleted queue is back; once their retry is due, its rows are published,
        # a few per pass; the others are set aside again (and not counted twice).
        await declare_topology(settings)
        await db.execute("UPDATE tasks SET publish_retry_at = now() WHERE id = ANY($1)", low)
        passes = [await relay.pass_once() for _ in range(BAD["low"] // SET_ASIDE_RETRY_BATCH)]
        assert passes == [SET_ASIDE_RETRY_BATCH] * len(passes)
        await db.execute("UPDATE tasks SET publish_retry_at = now() WHERE id = ANY($1)", gone)
        assert await relay.pass_once() == 0
        retried = await db.fetchval(
            "SELECT count(*) FROM tasks WHERE id = ANY($1) AND publish_retry_at > now()", gone
        )
        assert retried == SET_ASIDE_RETRY_BATCH
    finally:
        await relay.stop()
        await connection_link.stop()
    assert len(await drain(settings, "low", expect=BAD["low"])) == BAD["low"]
    assert (await store.task(newer)).published_at is not None
    assert sum(
        s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "taskq_publishes_set_aside_total"
    ) == sum(BAD.values())


def test_a_failing_row_is_told_from_a_failing_broker() -> None:
    assert _fault_of_row(Unpublishable("no route"), others_confirmed=False) == "unroutable"
    assert _fault_of_row(DelayTooLong("2h"), others_confirmed=False) == "delay_too_long"
    # A nack is the row's only while the broker confirms the others.
    assert _fault_of_row(Nacked("nack"), others_confirmed=True) == "nacked"
    assert _fault_of_row(Nacked("nack"), others_confirmed=False) is None
    # Timeouts, a closed channel, an unreachable broker: the broker's.
    assert _fault_of_row(PublishError("unreachable"), others_confirmed=True) is None
