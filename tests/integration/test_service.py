"""The one lifecycle of the background parts (taskq.service), without services.

Every part keeps the contract: stopping before starting does nothing (and the
part can still start), starting a running part does nothing, stopping twice
does nothing, and a stopped part cannot start again. The parts that would talk
to Postgres or RabbitMQ get fakes, or addresses where nothing answers (they keep
trying in the background, which is what they do when a service is down).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from taskq.amqp.broker import Link, Publisher
from taskq.client import Client
from taskq.enqueue.inserts import InsertBatcher
from taskq.errors import BrokerError, ConfigError, StoreError
from taskq.fleet.marker import Marker
from taskq.fleet.relay import Outbox, Relay
from taskq.fleet.sweeper import Sweeper
from taskq.handlers import Registry
from taskq.metrics import WorkerMetrics
from taskq.service import Loop, OnStop, Service, Services, State
from taskq.settings import Settings, load_settings
from taskq.web.stream import Hub
from taskq.worker.claims import Claimer
from taskq.worker.consumer import Acker, Buffers, Consumers
from taskq.worker.outcomes import Recorder
from taskq.worker.worker import Worker

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


def claimer() -> Claimer:
    return Claimer(
        store(),
        publisher(),
        Buffers(["default"]),
        Acker(),
        begin=lambda row: None,
        metrics=WorkerMetrics(),
        worker_id="test",
        lease=30.0,
        concurrency=4,
    )


def consumers() -> Consumers:
    return Consumers(
        settings().topology().names,
        ["default"],
        10,
        on_delivery=lambda delivery: None,
        on_invalid=lambda queue, error: None,
        acker=Acker(),
        link=Link(NO_BROKER, name="test"),
    )


# Each part that starts without a service: its factory.
PARTS: dict[str, Callable[[], Service]] = {
    "link": lambda: Link(NO_BROKER, name="test"),
    "marker": lambda: Marker(store()),
    "outbox": lambda: Outbox(store(), publisher()),
    "relay": lambda: Relay(store(), NO_DATABASE, publisher(), interval=0.05),
    "sweeper": sweeper,
    "recorder": lambda: Recorder(store(), cast(Any, None), WorkerMetrics(), lambda token: None),
    "claimer": claimer,
    "insert batcher": lambda: InsertBatcher(store()),
    "stream hub": lambda: Hub(cast(Any, None), asyncio.Event(), 1),
    "loop": lambda: Loop(forever, name="test-loop"),
    "client": lambda: Client(settings(), store(), publisher(), link=Link(NO_BROKER, name="test")),
    "services": lambda: Services([Loop(forever, name="a"), Loop(forever, name="b")]),
}


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    # Parts retrying an absent service say so; not this test's subject.
    caplog.set_level(logging.CRITICAL)


@pytest.mark.parametrize("make", PARTS.values(), ids=PARTS.keys())
async def test_stopping_before_starting_does_nothing(make: Callable[[], Service]) -> None:
    part = make()
    await part.stop()
    await part.stop(0.0)
    assert part.state is State.NEW
    await part.start()  # it still starts
    assert state(part) is State.RUNNING
    await part.stop(0.1)
    assert state(part) is State.STOPPED


@pytest.mark.parametrize("make", PARTS.values(), ids=PARTS.keys())
async def test_start_twice_runs_once_and_stop_twice_stops_once(
    make: Callable[[], Service],
) -> None:
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


@pytest.mark.parametrize("make", PARTS.values(), ids=PARTS.keys())
async def test_a_stopped_part_does_not_start_again(make: Callable[[], Service]) -> None:
    part = make()
    await part.start()
    await part.stop(0.1)
    with pytest.raises(RuntimeError, match="was stopped"):
        await part.start()
    assert part._tasks == []


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


async def test_consumers_that_cannot_start_stop_as_if_never_started() -> None:
    part = consumers()
    await part.stop()
    with pytest.raises(BrokerError, match="unreachable"):
        await part.start()  # the link is not connected
    assert state(part) is State.STOPPED
    await part.stop()
    with pytest.raises(RuntimeError, match="was stopped"):
        await part.start()


async def test_a_sweeper_without_a_database_url_cannot_start_alone() -> None:
    part = sweeper(database_url=None)
    with pytest.raises(ConfigError, match="database_url"):
        await part.start()
    await part.stop()  # its duties may still run under a relay; stopping is safe
    assert part.duties


async def test_a_worker_stopped_before_starting_does_nothing() -> None:
    worker = Worker(settings(), Registry())
    await worker.stop()
    await worker.stop(0.0)
    assert worker.state is State.NEW


async def test_a_worker_that_cannot_start_closes_what_it_opened() -> None:
    worker = Worker(settings(), Registry())
    with pytest.raises(StoreError):
        await worker.start()
    assert worker.state is State.STOPPED
    assert worker._parts.state is State.STOPPED
    await worker.stop()  # a no-op now
    with pytest.raises(RuntimeError, match="was stopped"):
        await worker.start()


class Recording(Service):
    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name, self._log, self._fail = name, log, fail

    async def _start(self) -> None:
        if self._fail:
            raise OSError(f"{self.name} failed")
        self._log.append(f"start {self.name}")

    async def _stop(self, timeout: float) -> None:
        self._log.append(f"stop {self.name} {timeout:g}")


async def test_services_start_in_order_and_stop_in_reverse() -> None:
    log: list[str] = []
    group = Services([Recording("a", log), Recording("b", log)])
    await group.start()
    await group.add(Recording("c", log))  # started at once: the group runs
    await group.stop()
    assert log == ["start a", "start b", "start c", "stop c 5", "stop b 5", "stop a 5"]


@pytest.mark.parametrize(
    ("timeout", "given"),
    [(2.0, ["stop slow 2", "stop a 2"]), (None, ["stop slow 15", "stop a 5"])],
    ids=["the timeout given", "each part's own"],
)
async def test_services_give_each_part_the_timeout_given_or_its_own(
    timeout: float | None, given: list[str]
) -> None:
    log: list[str] = []
    slow = Recording("slow", log)
    slow.stop_timeout = 15.0
    group = Services([Recording("a", log), slow])
    await group.start()
    await group.stop(timeout)
    assert log[2:] == given


async def test_a_part_that_fails_to_start_stops_the_parts_started_before_it() -> None:
    log: list[str] = []
    group = Services([Recording("a", log), Recording("b", log), Recording("c", log, fail=True)])
    with pytest.raises(OSError, match="c failed"):
        await group.start()
    # c closes what it may have opened itself, then the group stops b and a.
    assert log == ["start a", "start b", "stop c 0", "stop b 0", "stop a 0"]
    assert group.state is State.STOPPED


async def test_a_part_whose_stop_fails_does_not_keep_the_others_running() -> None:
    log: list[str] = []

    async def fails() -> None:
        raise OSError("closing failed")

    group = Services([Recording("a", log), OnStop(fails, name="bad")])
    await group.start()
    await group.stop()
    assert log == ["start a", "stop a 5"]


async def test_on_stop_calls_its_close_once_and_only_once_started() -> None:
    calls: list[int] = []

    async def close() -> None:
        calls.append(1)

    part = OnStop(close, name="pool")
    await part.stop()
    assert calls == []
    await part.start()
    await part.stop()
    await part.stop()
    assert calls == [1]


async def test_a_loop_ends_with_its_work_cancelled() -> None:
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await forever()
        finally:
            cancelled.set()

    part = Loop(work, name="test-loop")
    await part.start()
    await asyncio.sleep(0)
    await part.stop()
    assert cancelled.is_set()
