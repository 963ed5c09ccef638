"""The one lifecycle of the background parts (taskq.service), for the parts that need
no service: the contract (tests/support/lifecycle.py) on parts built on fakes,
:class:`Services`' order and timeouts, :class:`OnStop` and :class:`Loop`.

The parts that reach for Postgres or RabbitMQ when they start (the broker link,
the relay, the sweeper, the client, the worker) keep the contract in
tests/integration/test_service.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest

from taskq.amqp.broker import Link
from taskq.enqueue.inserts import InsertBatcher
from taskq.errors import BrokerError, ConfigError
from taskq.fleet.marker import Marker
from taskq.fleet.relay import Outbox
from taskq.handlers import Registry
from taskq.metrics import WorkerMetrics
from taskq.service import Loop, OnStop, Service, Services, State
from taskq.web.stream import Hub
from taskq.worker.claims import Claimer
from taskq.worker.consumer import Acker, Buffers, Consumers
from taskq.worker.outcomes import Recorder
from taskq.worker.worker import Worker
from tests.support.lifecycle import (
    NO_BROKER,
    Check,
    Make,
    contract_cases,
    forever,
    publisher,
    settings,
    state,
    store,
    sweeper,
)


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


async def nothing() -> None:
    return None


# Each part that starts with no service (nothing it starts connects): its factory.
PARTS: dict[str, Callable[[], Service]] = {
    "marker": lambda: Marker(store()),
    "outbox": lambda: Outbox(store(), publisher()),
    "recorder": lambda: Recorder(store(), cast(Any, None), WorkerMetrics(), lambda token: None),
    "claimer": claimer,
    "insert batcher": lambda: InsertBatcher(store()),
    "stream hub": lambda: Hub(cast(Any, None), asyncio.Event(), 1),
    "loop": lambda: Loop(forever, name="test-loop"),
    "on stop": lambda: OnStop(nothing, name="test-close"),
    "services": lambda: Services([Loop(forever, name="a"), Loop(forever, name="b")]),
}


@pytest.mark.parametrize(("make", "check"), contract_cases(PARTS))
async def test_a_part_keeps_the_contract(make: Make, check: Check) -> None:
    await check(make)


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
