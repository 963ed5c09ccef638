"""The client's lifecycle against the real services: ``async with Client.connect(...)``,
or awaited and closed; what it queued is published before it closes."""

from __future__ import annotations

import pytest

from taskq.client import Client
from taskq.service import State
from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology, drain

pytestmark = pytest.mark.integration


async def test_async_with_enqueues_and_leaving_the_block_publishes_then_closes(
    settings: Settings,
) -> None:
    await declare_topology(settings)
    async with Client.connect(settings) as client:
        assert client.running and client.outbox.running
        await client.store.register_task_types([("demo.echo", "default", 5, 30.0, None)])
        result = await client.enqueue("demo.echo", {"n": 1})
        assert result.created
    assert client.state is State.STOPPED
    assert client.outbox.state is State.STOPPED
    assert client.store.pool.is_closing()
    messages = await drain(settings, "default", expect=1)
    assert [m.message_id for m in messages] == [str(result.id)]


async def test_an_awaited_client_runs_until_closed_and_closes_once(settings: Settings) -> None:
    client = await Client.connect(settings)
    assert client.running
    await client.close()
    await client.close()
    assert client.state is State.STOPPED
    assert client.store.pool.is_closing()


async def test_an_error_in_the_block_closes_the_client(settings: Settings) -> None:
    opened: list[Client] = []
    with pytest.raises(RuntimeError, match="the caller failed"):
        async with Client.connect(settings) as client:
            opened.append(client)
            raise RuntimeError("the caller failed")
    assert [c.state for c in opened] == [State.STOPPED]
