"""The outbox: tasks committed while the broker is away are published once it is back,
and tasks enqueued inside a caller's transaction exist and are published only on commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from taskq.amqp.broker import Link, Publisher
from taskq.client import Client
from taskq.fleet.marker import Marker
from taskq.fleet.relay import Outbox, Relay
from taskq.model import ClaimedTask, OwedPublish
from taskq.settings import Settings
from taskq.store import NewTask, Store
from tests.support.api_fixtures import (
    assert_problem,
    declare_topology,
    drain,
    put_type,
    running_api,
)
from tests.support.proxy import proxied

pytestmark = pytest.mark.integration


async def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@dataclass
class Publishing:
    store: Store
    link: Link
    publisher: Publisher


@pytest.fixture
async def publishing(settings: Settings) -> AsyncIterator[Publishing]:
    """The declared topology, a store and a publisher on a broker link."""
    await declare_topology(settings)
    store = await Store.connect(settings.database_url)
    link = Link(settings.amqp_url, name="test")
    await link.start()
    await link.ready.wait()
    try:
        yield Publishing(store, link, Publisher(link, settings.topology(), settings.max_delay))
    finally:
        await link.stop()
        await store.close()


async def unpublished(settings: Settings) -> int:
    connection = await asyncpg.connect(settings.database_url)
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM tasks WHERE published_at IS NULL")
        )
    finally:
        await connection.close()


async def test_enqueue_with_the_broker_down_is_published_once_it_is_back(
    settings: Settings,
) -> None:
    await declare_topology(settings)
    proxy, through = await proxied(settings, "broker")
    async with running_api(through) as api:
        await put_type(api, "demo.echo")
        await proxy.cut()  # the broker is gone for this API
        await asyncio.sleep(0.2)
        ids = []
        for n in range(5):
            response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {"n": n}})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        health = (await api.get("/healthz")).json()
        assert health["status"] == "degraded"
        assert await unpublished(settings) == 5
        metrics = (await api.get("/metrics")).text
        assert "taskq_unpublished_tasks 5.0" in metrics

        await proxy.start()  # the broker is back; the relay publishes what is owed
        await wait_for(lambda: _none_unpublished(settings), timeout=20)
        messages = await drain(settings, "default", expect=5)
        assert sorted(m.message_id for m in messages) == sorted(ids)  # each exactly once
        assert (await api.get("/healthz")).json()["status"] == "ok"
    await proxy.cut()


async def _none_unpublished(settings: Settings) -> bool:
    return await unpublished(settings) == 0


async def test_client_inside_a_transaction(settings: Settings) -> None:
    await declare_topology(settings)
    client = await Client.connect(settings)
    relay = Relay(client.store, settings.database_url, client.publisher, interval=0.2)
    await relay.start()
    try:
        await client.store.put_task_type(
            "demo.echo",
            queue="default",
            max_attempts=3,
            timeout_seconds=10,
            backoff_json=None,
            payload_schema_json=None,
            enabled=True,
        )
        connection = await asyncpg.connect(settings.database_url)
        try:
            await connection.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            with pytest.raises(RuntimeError):
                async with connection.transaction():
                    await connection.execute("INSERT INTO orders VALUES (1)")
                    await client.enqueue("demo.echo", {"order": 1}, connection=connection)
                    raise RuntimeError("the caller's transaction fails")
            assert await connection.fetchval("SELECT count(*) FROM tasks") == 0

            async with connection.transaction():
                await connection.execute("INSERT INTO orders VALUES (2)")
                result = await client.enqueue("demo.echo", {"order": 2}, connection=connection)
                assert result.created
                # Not published before the commit.
                await asyncio.sleep(0.5)
                assert await drain(settings, "default", expect=0, timeout=0.1) == []
        finally:
            await connection.close()
        messages = await drain(settings, "default", expect=1, timeout=10)
        assert [m.message_id for m in messages] == [str(result.id)]
        await wait_for(lambda: _none_unpublished(settings))
    finally:
        await relay.stop()
        await client.close()


async def test_only_one_relay_is_active(settings: Settings) -> None:
    store = await Store.connect(settings.database_url)
    link = Link(settings.amqp_url, name="test")
    await link.start()
    publisher = Publisher(link, settings.topology(), settings.max_delay)
    relays = [Relay(store, settings.database_url, publisher, interval=0.1) for _ in range(3)]
    for relay in relays:
        await relay.start()
    try:
        await asyncio.sleep(1.0)
        assert sum(relay.active for relay in relays) == 1
        active = next(relay for relay in relays if relay.active)
        await active.stop()  # the lock is released; another relay takes over
        others = [relay for relay in relays if relay is not active]
        await wait_for(lambda: _any_active(others), timeout=5)
        assert sum(relay.active for relay in others) == 1
    finally:
        for relay in relays:
            await relay.stop()
        await link.stop()
        await store.close()


async def _any_active(relays: list[Relay]) -> bool:
    return any(relay.active for relay in relays)


async def test_database_down_is_503_and_recovers(settings: Settings) -> None:
    await declare_topology(settings)
    proxy, through = await proxied(settings, "database")
    async with running_api(through) as api:
        await put_type(api, "demo.echo")
        await proxy.cut()
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {}})
        assert loop.time() - started < 15
        assert_problem(response, 503)
        health = assert_problem(await api.get("/healthz"), 503)
        assert health["database"].startswith("down")
        assert_problem(await api.get(f"/tasks/{uuid.uuid4()}"), 503)

        await proxy.start()
        await wait_for(lambda: _accepts(api), timeout=20)
        # /healthz checks at most once a second: it says so within a second or two.
        await wait_for(lambda: _healthy(api), timeout=5)
    await proxy.cut()


async def _healthy(api: httpx.AsyncClient) -> bool:
    response = await api.get("/healthz")
    return response.status_code == 200 and response.json()["status"] == "ok"


async def _accepts(api: httpx.AsyncClient) -> bool:
    response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {}})
    return response.status_code == 201


async def test_a_row_that_waited_too_long_is_left_to_the_relay_alone(
    settings: Settings, publishing: Publishing
) -> None:
    """When enqueues outpace the broker, a row that waited in the outbox past its bound
    is not published there but handed to the relay, which a NOTIFY wakes to publish it
    long before its grace; every task has exactly one envelope."""
    store, publisher = publishing.store, publishing.publisher
    outbox = Outbox(store, publisher, in_flight=4, max_wait=0.2)
    # A grace longer than the test: whatever the relay publishes, it was told to.
    relay = Relay(store, settings.database_url, publisher, min_age=600.0, interval=0.1)
    try:
        await store.register_task_types([("demo.echo", "default", 5, 30.0, None)])

        async def committed(count: int) -> list[OwedPublish]:
            tasks = [NewTask(uuid.uuid4(), "demo.echo", "{}") for _ in range(count)]
            results = await store.enqueue(tasks)
            return [r.owed() for r in results if r.answer]

        await relay.start()
        await wait_for(lambda: _any_active([relay]))
        late = await committed(3)
        for row in late:
            assert outbox.submit(row)
        await asyncio.sleep(0.4)  # they wait past max_wait before the outbox runs
        await outbox.start()
        fresh = await committed(4)
        for row in fresh:
            assert outbox.submit(row)
        await outbox.drain(10)
        await outbox.stop()
        assert outbox.handed_over == 3

        async def all_published() -> bool:
            return await unpublished(settings) == 0

        await wait_for(all_published)
        messages = await drain(settings, "default", expect=7)
        ids = sorted(str(row.id) for row in late + fresh)
        assert sorted(m.message_id for m in messages) == ids  # each exactly once
    finally:
        await relay.stop()


async def test_a_batch_that_fails_unexpectedly_leaves_the_outbox_running(
    settings: Settings, publishing: Publishing, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever breaks one batch (here a row the publish cannot read), the outbox logs
    it, leaves those rows owed, and publishes the next batch."""
    store = publishing.store
    outbox = Outbox(store, publishing.publisher, in_flight=1)
    await store.register_task_types([("demo.echo", "default", 5, 30.0, None)])
    (result,) = await store.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}")])
    row = result.owed()._replace(delay=0.0)
    broken = row._replace(delay=None)  # type: ignore[arg-type]  # deliberately ill-typed
    await outbox.start()
    assert outbox.submit(broken)
    await outbox.drain(10)
    assert "not published, left to the relay" in caplog.text
    assert await unpublished(settings) == 1
    assert outbox.submit(row)
    await outbox.drain(10)
    await outbox.stop()
    assert await unpublished(settings) == 0
    (message,) = await drain(settings, "default", expect=1)
    assert message.message_id == str(row.id)


async def test_a_publish_is_marked_after_the_delay_unless_a_claim_recorded_it(
    settings: Settings, publishing: Publishing
) -> None:
    """The marker writes a row version only for tasks nobody claimed within its delay;
    a claim in between records the publish itself, and the marker changes nothing."""
    store = publishing.store
    marker = Marker(store, interval=0.02, delay=0.5)
    await store.register_task_types([("demo.echo", "default", 5, 30.0, None)])
    results = await store.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}") for _ in range(2)])
    waiting, claimed = (result.task_id for result in results)
    db = await asyncpg.connect(settings.database_url)

    async def version(task_id: uuid.UUID) -> asyncpg.Record:
        return await db.fetchrow(
            "SELECT xmin::text AS version, published_at, started_at FROM tasks WHERE id = $1",
            task_id,
        )

    async def waiting_marked() -> bool:
        return (await version(waiting))["published_at"] is not None

    await marker.start()
    try:
        for task_id in (waiting, claimed):
            marker.add(task_id, 0)
        await asyncio.sleep(0.2)
        assert not await waiting_marked()  # younger than the delay
        (decision,) = await store.claim([claimed], "w1", 30.0)
        assert isinstance(decision, ClaimedTask)
        after_claim = await version(claimed)
        assert after_claim["published_at"] == after_claim["started_at"]  # the claim recorded it
        await wait_for(waiting_marked, timeout=5)
        assert await version(claimed) == after_claim  # the marker wrote no version of its own
    finally:
        await marker.stop()
        await db.close()


async def test_closing_the_marker_records_every_publish_at_once(
    settings: Settings, publishing: Publishing
) -> None:
    store = publishing.store
    marker = Marker(store, delay=600.0)
    await store.register_task_types([("demo.echo", "default", 5, 30.0, None)])
    results = await store.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}") for _ in range(3)])
    await marker.start()
    for result in results:
        marker.add(result.task_id, result.generation)
    assert await unpublished(settings) == 3
    await marker.stop()
    assert await unpublished(settings) == 0


async def test_a_marker_that_loses_the_database_leaves_rows_owed_and_goes_on(
    settings: Settings, publishing: Publishing, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed marker statement leaves its rows owed (the relay publishes them again)
    and stops that pass; the publishes not yet tried are recorded once it is back."""
    await publishing.store.register_task_types([("demo.echo", "default", 5, 30.0, None)])
    results = await publishing.store.enqueue(
        [NewTask(uuid.uuid4(), "demo.echo", "{}") for _ in range(3)]
    )
    proxy, through = await proxied(settings, "database")
    store = await Store.connect(through.database_url)
    marker = Marker(store, delay=0.0, batch=1)
    try:
        for result in results:
            marker.add(result.task_id, result.generation)
        await proxy.cut()
        await marker.flush()
        assert caplog.text.count("could not record 1 publishes") == 1
        assert await unpublished(settings) == 3
        await proxy.start()
        await marker.flush()
        assert await unpublished(settings) == 1  # the first stays owed, for the relay
    finally:
        await marker.stop()
        await store.close()
        await proxy.cut()
