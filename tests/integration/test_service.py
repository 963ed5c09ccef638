"""The one lifecycle of the background parts (taskq.service), for the parts that reach
for Postgres or RabbitMQ when they start: the broker link, the relay, the sweeper,
the client and the worker. They get addresses where nothing answers (they keep
trying in the background, which is what they do when a service is down), so no
service need run; they stay out of the unit layer only because they connect.

The contract's clauses are in tests/support/lifecycle.py; the parts that start
with no connection keep it in tests/unit/test_service.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from taskq.amqp.broker import Link
from taskq.client import Client
from taskq.errors import StoreError
from taskq.fleet.relay import Relay
from taskq.handlers import Registry
from taskq.service import Service, State
from taskq.worker.worker import Worker
from tests.support.lifecycle import (
    NO_BROKER,
    NO_DATABASE,
    Check,
    FakeStore,
    Make,
    contract_cases,
    publisher,
    settings,
    state,
    store,
    sweeper,
)

# Each part that connects when it starts: its factory.
PARTS: dict[str, Callable[[], Service]] = {
    "link": lambda: Link(NO_BROKER, name="test"),
    "relay": lambda: Relay(store(), NO_DATABASE, publisher(), interval=0.05),
    "sweeper": sweeper,
    "client": lambda: Client(settings(), store(), publisher(), link=Link(NO_BROKER, name="test")),
}


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    # Parts retrying an absent service say so; not this test's subject.
    caplog.set_level(logging.CRITICAL)


@pytest.mark.parametrize(("make", "check"), contract_cases(PARTS))
async def test_a_part_keeps_the_contract(make: Make, check: Check) -> None:
    await check(make)


async def test_the_client_closes_what_it_owns_once() -> None:
    fake = FakeStore()
    link = Link(NO_BROKER, name="test")
    client = Client(settings(), cast(Any, fake), publisher(link), link=link)
    assert client.outbox.state is State.NEW  # nothing runs after __init__
    await client.start()
    assert link.running and client.outbox.running
    await client.close()
    await client.close()
    assert fake.closed == 1
    assert state(link) is State.STOPPED and state(client.outbox) is State.STOPPED


async def test_a_worker_that_cannot_start_closes_what_it_opened() -> None:
    worker = Worker(settings(), Registry())
    with pytest.raises(StoreError):
        await worker.start()
    assert worker.state is State.STOPPED
    assert worker._parts.state is State.STOPPED
    await worker.stop()  # a no-op now
    with pytest.raises(RuntimeError, match="was stopped"):
        await worker.start()
