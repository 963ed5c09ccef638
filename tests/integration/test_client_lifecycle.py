"""The client's lifecycle against the real services: ``async with Client.connect(...)``,
or awaited and closed; what it queued is published before it closes. And the API's
lifespan, which runs the client with its other parts as one group."""

from __future__ import annotations

import pytest

from taskq.client import Client
from taskq.service import State
from taskq.settings import Settings
from taskq.web import stream
from taskq.web.api import create_app
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


@pytest.mark.parametrize("relay", [True, False], ids=["with the relay", "without"])
async def test_the_api_lifespan_starts_its_parts_and_stops_them_all(
    settings: Settings, relay: bool
) -> None:
    app = create_app(settings, relay=relay)
    state = app.state
    async with app.router.lifespan_context(app):
        assert state.client.running and state.hub.running
        assert state.link is state.client.link and state.link.running
        assert not state.stopping.is_set()
    assert state.stopping.is_set()  # the open event streams were told to end
    assert state.hub.state is State.STOPPED and state.client.state is State.STOPPED
    assert state.link.state is State.STOPPED and state.client.store.pool.is_closing()


async def test_an_api_part_that_cannot_start_stops_the_client(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def cannot_start(self: stream.Hub) -> None:
        raise OSError("the hub cannot start")

    monkeypatch.setattr(stream.Hub, "_start", cannot_start)
    app = create_app(settings, relay=False)
    with pytest.raises(OSError, match="the hub cannot start"):
        async with app.router.lifespan_context(app):
            pass
    assert app.state.client.state is State.STOPPED
    assert app.state.client.store.pool.is_closing()
