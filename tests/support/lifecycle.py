"""The lifecycle contract of taskq.service, as checks any background part must pass, and
the fakes its parts are built on (tests/unit/test_service.py,
tests/integration/test_service.py).

Every part keeps the contract: stopping before starting does nothing (and the
part can still start), starting a running part does nothing, stopping twice
does nothing, and a stopped part cannot start again. The parts that would talk
to Postgres or RabbitMQ get fakes, or addresses where nothing answers (they keep
trying in the background, which is what they do when a service is down).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from taskq.amqp.broker import Link, Publisher
from taskq.fleet.sweeper import Sweeper
from taskq.service import Service, State
from taskq.settings import Settings, load_settings

# Addresses where nothing listens: a part's connection attempts fail at once.
NO_DATABASE = "postgresql://postgres@127.0.0.1:1/none"
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"


class FakeStore:
    """A store whose statements find nothing to do."""

    schema = "taskq"
    notify_channel = "taskq_enqueued"

    def __init__(self) -> None:
        self.closed = 0

    async def mark_published(self, items: Any) -> None:
        return None

    async def notify_owed(self, ids: Any) -> None:
        return None

    async def close(self) -> None:
        self.closed += 1


def state(part: Any) -> State:
    """The part's state, read afresh (mypy keeps what an earlier assert narrowed)."""
    return part.state  # type: ignore[no-any-return]


def settings() -> Settings:
    return load_settings(database_url=NO_DATABASE, amqp_url=NO_BROKER)


def store() -> Any:
    return cast(Any, FakeStore())


def publisher(link: Link | None = None) -> Publisher:
    return Publisher(link or Link(NO_BROKER, name="test"), settings().topology(), 3600.0)


async def forever() -> None:
    await asyncio.Event().wait()


def sweeper(database_url: str | None = NO_DATABASE) -> Sweeper:
    link = Link(NO_BROKER, name="test")
    names = settings().topology().names
    return Sweeper(store(), publisher(link), link, names, ["default"], database_url=database_url)


async def stopping_before_starting_does_nothing(make: Callable[[], Service]) -> None:
    part = make()
    await part.stop()
    await part.stop(0.0)
    assert part.state is State.NEW
    await part.start()  # it still starts
    assert state(part) is State.RUNNING
    await part.stop(0.1)
    assert state(part) is State.STOPPED


async def start_twice_runs_once_and_stop_twice_stops_once(make: Callable[[], Service]) -> None:
    part = make()
    await part.start()
    tasks = list(part._tasks)
    await part.start()
    assert part._tasks == tasks  # nothing started a second time
    assert all(not task.done() for task in tasks)
    await part.stop(0.1)
    assert all(task.done() for task in tasks)  # every background task ended
    assert part._tasks == []
    await part.stop(0.1)
    assert state(part) is State.STOPPED


async def a_stopped_part_does_not_start_again(make: Callable[[], Service]) -> None:
    part = make()
    await part.start()
    await part.stop(0.1)
    with pytest.raises(RuntimeError, match="was stopped"):
        await part.start()
    assert part._tasks == []


Make = Callable[[], Service]
Check = Callable[[Make], Awaitable[None]]

# The contract, one check a clause.
CONTRACT: dict[str, Check] = {
    "stopping before starting does nothing": stopping_before_starting_does_nothing,
    "start twice runs once, stop twice stops once": start_twice_runs_once_and_stop_twice_stops_once,
    "a stopped part does not start again": a_stopped_part_does_not_start_again,
}


def contract_cases(parts: dict[str, Make]) -> list[Any]:
    """``(make, check)`` for each part and each clause of the contract, named by both."""
    return [
        pytest.param(make, check, id=f"{part}: {clause}")
        for part, make in parts.items()
        for clause, check in CONTRACT.items()
    ]
