"""`DELETE /queues/{name}`: the rows are cancelled first, then the broker queue is purged,
and a failure midway leaves no ENQUEUED task without its envelope."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from taskq.amqp.broker import Link
from taskq.errors import BrokerError
from taskq.fleet.relay import Relay
from taskq.fleet.sweeper import Sweeper
from taskq.metrics import WorkerMetrics
from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology, drain, put_type, running_api
from tests.support.faults import eventually, queue_depth
from tests.support.proxy import TcpProxy, proxied
from tests.support.worker_fixtures import Harness, harness

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}


async def depth(h: Harness, queue: str) -> int:
    return (await queue_depth(h, h.names.queue(queue)))[0]


async def statuses(db: asyncpg.Connection, ids: list[str]) -> list[str]:
    rows = await db.fetch(
        "SELECT status FROM tasks WHERE id = ANY($1::uuid[]) ORDER BY id",
        [uuid.UUID(i) for i in ids],
    )
    return [row["status"] for row in rows]


async def enqueue(api: httpx.AsyncClient, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = await api.post("/enqueue", json={"type": "a.v1", "payload": {}})
        assert response.status_code == 201, response.text
        ids.append(str(response.json()["id"]))
    return ids


@pytest.fixture
async def through_proxy(settings: Settings) -> AsyncIterator[tuple[TcpProxy, httpx.AsyncClient]]:
    """The API (without a relay) whose database connections run through a proxy."""
    await declare_topology(settings)
    proxy, through = await proxied(settings, "database")
    try:
        async with running_api(through, relay=False) as api:
            await put_type(api, "a.v1")
            yield proxy, api
    finally:
        await proxy.cut()


def purge_with(api: httpx.AsyncClient, before: Callable[[], Awaitable[Any]], after: Any) -> None:
    """Make the API's broker purge run ``before`` first and ``after`` once it is done."""
    reader = api.app.state.monitor.reader  # type: ignore[attr-defined]
    original = reader.purge

    async def purge(queue: str) -> int:
        await before()
        purged = await original(queue)
        await after()
        return int(purged)

    reader.purge = purge


async def test_a_failing_database_stops_the_purge_before_the_broker_is_touched(
    settings: Settings, db: asyncpg.Connection, through_proxy: tuple[TcpProxy, httpx.AsyncClient]
) -> None:
    proxy, api = through_proxy
    async with harness(settings) as h:
        ids = await enqueue(api, 5)
        await eventually(lambda: _is(depth(h, "default"), 5), 20, "5 envelopes in the queue")
        await proxy.cut()
        response = await api.delete("/queues/default", params={"confirm": "default"}, headers=JSON)
        assert response.status_code == 503, response.text
        await proxy.start()
        # Nothing changed: every task ENQUEUED, every envelope where it was.
        assert await statuses(db, ids) == ["ENQUEUED"] * 5
        assert await depth(h, "default") == 5

        # With the broker failing instead, the tasks are cancelled all the same and
        # their envelopes stay, to be dropped when consumed.
        async def broker_down(queue: str) -> int:
            raise BrokerError("the broker is unreachable")

        api.app.state.monitor.reader.purge = broker_down  # type: ignore[attr-defined]
        response = await api.delete("/queues/default", params={"confirm": "default"}, headers=JSON)
        assert response.status_code == 200, response.text
        assert response.json() == {"queue": "default", "purged_messages": None, "cancelled": 5}
        assert await statuses(db, ids) == ["CANCELLED"] * 5
        assert await depth(h, "default") == 5
        assert await db.fetchval("SELECT count(*) FROM queue_purges") == 0


async def test_a_task_enqueued_during_the_purge_keeps_an_envelope(settings: Settings) -> None:
    await declare_topology(settings)
    async with harness(settings) as h, running_api(settings) as api:
        await put_type(api, "a.v1")
        doomed = await enqueue(api, 3)
        await eventually(lambda: _is(depth(h, "default"), 3), 20, "3 envelopes in the queue")
        window: list[uuid.UUID] = []

        async def enqueue_in_the_window() -> None:
            # After the rows were cancelled, before the broker purge: its envelope is purged.
            window.append(await h.enqueue("a.v1"))

        purge_with(api, enqueue_in_the_window, _nothing)
        response = await api.delete("/queues/default", params={"confirm": "default"}, headers=JSON)
        assert response.status_code == 200, response.text
        assert response.json() == {"queue": "default", "purged_messages": 4, "cancelled": 3}
        # The API's relay publishes it again.
        [message] = await drain(settings, "default", expect=1, timeout=15)
        assert message.message_id == str(window[0])
        assert (await h.task(window[0])).status == "ENQUEUED"
        for task_id in doomed:
            assert (await h.task(uuid.UUID(task_id))).status == "CANCELLED"


async def test_a_purge_cut_short_after_the_broker_purge_is_ended_by_the_sweeper(
    settings: Settings, through_proxy: tuple[TcpProxy, httpx.AsyncClient]
) -> None:
    proxy, api = through_proxy
    async with harness(settings) as h:
        await enqueue(api, 2)
        await eventually(lambda: _is(depth(h, "default"), 2), 20, "2 envelopes in the queue")
        window: list[uuid.UUID] = []

        async def enqueue_in_the_window() -> None:
            window.append(await h.enqueue("a.v1"))

        purge_with(api, enqueue_in_the_window, proxy.cut)  # the database goes after the purge
        response = await api.delete("/queues/default", params={"confirm": "default"}, headers=JSON)
        assert response.status_code == 503, response.text
        await proxy.start()
        assert await depth(h, "default") == 0  # the window task's envelope is gone...
        link = Link(settings.amqp_url, name="test-sweeper")
        await link.start()
        await link.ready.wait()
        sweeper = Sweeper(
            h.store, h.publisher, link, h.names, settings.queues, purge_ended_after=0,
            metrics=WorkerMetrics(),
        )  # fmt: skip
        relay = Relay(h.store, settings.database_url, h.publisher, duties=[sweeper.end_purges])
        try:
            await relay.pass_once()  # ...the sweeper owes it again, the relay publishes it
            assert await sweeper.end_purges() == 0  # ended once
        finally:
            await relay.stop()
            await sweeper.stop()
            await link.stop()
        [message] = await drain(settings, "default", expect=1)
        assert message.message_id == str(window[0])


async def test_the_purge_locks_rows_in_id_order_as_claims_do(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A transaction that locks tasks in id order, as a claim does, and a purge of
    their queue: neither waits for the other in a cycle (a deadlock)."""
    await declare_topology(settings)
    async with running_api(settings, relay=False) as api:
        await put_type(api, "a.v1")
        ids = sorted(uuid.uuid4() for _ in range(20))
        # The smallest id is due last and the second smallest first, and rows are
        # inserted by due time: any order but the ids' locks the second before the first.
        order = [ids[1], *ids[2:], ids[0]]
        for n, task_id in enumerate(order):
            await db.execute(
                "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds,"
                " run_at, published_at)"
                " VALUES ($1, 'a.v1', 'default', '{}', 3, 30, now() - make_interval(secs => $2),"
                " now())",
                task_id,
                100 - n,
            )
        claim = await asyncpg.connect(settings.database_url)
        try:
            transaction = claim.transaction()
            await transaction.start()
            await claim.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", ids[0])
            purge = asyncio.create_task(
                api.delete("/queues/default", params={"confirm": "default"}, headers=JSON)
            )

            async def purge_waits() -> bool:
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                return bool(waiting)

            await eventually(purge_waits, 20, "the purge waiting for the first row's lock", 0.05)
            await claim.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", ids[1])
            await transaction.commit()
            response = await purge
        finally:
            await claim.close()
        assert response.status_code == 200, response.text
        assert response.json()["cancelled"] == 20


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _nothing() -> None:
    pass
