"""Helpers for the worker tests: enqueue through the store and a publisher, watch Postgres,
read the DLQ, and run workers in-process or as ``taskq worker`` processes."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from taskq import demo
from taskq.amqp import broker
from taskq.amqp.broker import Link, Publisher
from taskq.amqp.envelope import Envelope
from taskq.fleet.sweeper import Sweeper
from taskq.handlers import Registry
from taskq.metrics import WorkerMetrics
from taskq.model import TaskEvent, TaskRecord
from taskq.settings import Settings
from taskq.store import NewTask, Store
from taskq.worker.worker import Worker

from . import ROOT
from .services import subprocess_env
from .stall import stall_report

# A worker that takes longer than this to stop has its tasks and the database's
# sessions reported (the stop goes on).
SLOW_STOP_SECONDS = 20.0


class Harness:
    """The test's own view of one namespace and database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = settings.topology().names

    async def open(self) -> Harness:
        connection = await broker.connect(self.settings.amqp_url, name="test-harness", robust=False)
        await broker.declare(connection, self.settings.topology())
        self.connection = connection
        self.store = await Store.connect(
            self.settings.database_url,
            statement_cache=self.settings.statement_cache,
            schema=self.settings.db_schema,
        )
        self.publisher = Publisher(connection, self.settings.topology(), self.settings.max_delay)
        return self

    async def close(self) -> None:
        await self.publisher.close()
        await self.connection.close()
        await self.store.close()

    async def put_type(self, name: str, **options: Any) -> None:
        backoff = options.get("backoff")
        schema = options.get("payload_schema")
        await self.store.put_task_type(
            name,
            queue=options.get("queue", "default"),
            max_attempts=options.get("max_attempts", 3),
            timeout_seconds=options.get("timeout", 30.0),
            backoff_json=None if backoff is None else json.dumps(backoff),
            payload_schema_json=None if schema is None else json.dumps(schema),
            enabled=True,
        )

    async def enqueue(
        self, task_type: str, payload: dict[str, Any] | None = None, **options: Any
    ) -> uuid.UUID:
        """Insert one task (its type must exist) and publish it, as the API does."""
        task_id = uuid.uuid4()
        task = NewTask(task_id, task_type, json.dumps(payload or {}), **options)
        [result] = await self.store.enqueue([task])
        assert result.outcome == "created" and result.answer is not None, result
        envelope = Envelope(task_id, task_type, 0)
        await self.publisher.publish(envelope, result.answer["queue"], delay=result.delay)
        await self.store.mark_published([(task_id, 0)])
        return task_id

    async def publish_raw(self, queue: str, body: bytes) -> None:
        """Publish bytes straight into a work queue, bypassing taskq."""
        channel = await self.connection.channel()
        try:
            exchange = await channel.get_exchange(self.names.direct, ensure=False)
            await exchange.publish(aio_pika.Message(body), queue)
        finally:
            await channel.close()

    async def task(self, task_id: uuid.UUID) -> TaskRecord:
        row = await self.store.task(task_id)
        assert row is not None
        return row

    async def events(self, task_id: uuid.UUID) -> list[TaskEvent]:
        return await self.store.task_events(task_id)

    async def wait_for(
        self, task_id: uuid.UUID, *statuses: str, timeout: float = 20.0
    ) -> TaskRecord:
        """Poll the task until its status is one of ``statuses``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            row = await self.task(task_id)
            if row.status in statuses:
                return row
            if asyncio.get_running_loop().time() > deadline:
                await stall_report(
                    f"task {task_id} still {row.status} (attempts {row.attempts},"
                    f" run_at {row.run_at}), wanted {statuses}",
                    self.settings.database_url,
                )
                raise AssertionError(f"task {task_id} still {row.status}, wanted {statuses}")
            await asyncio.sleep(0.05)

    async def dead_letters(
        self, expect: int, timeout: float = 10.0
    ) -> list[AbstractIncomingMessage]:
        """Take ``expect`` messages out of the DLQ (fewer if the timeout passes first)."""
        return await self.take(self.names.dlq, expect, timeout)

    async def take(
        self, queue_name: str, expect: int, timeout: float
    ) -> list[AbstractIncomingMessage]:
        channel = await self.connection.channel()
        try:
            queue = await channel.get_queue(queue_name, ensure=False)
            deadline = asyncio.get_running_loop().time() + timeout
            messages: list[AbstractIncomingMessage] = []
            while len(messages) < expect and asyncio.get_running_loop().time() < deadline:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                else:
                    messages.append(message)
            return messages
        finally:
            await channel.close()


@asynccontextmanager
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    opened = await Harness(settings).open()
    try:
        yield opened
    finally:
        await opened.close()


@asynccontextmanager
async def running_worker(
    settings: Settings, registry: Registry = demo.handlers, **options: Any
) -> AsyncIterator[Worker]:
    """A worker in this process, stopped (gracefully, 5 s grace) on exit."""
    options.setdefault("relay_interval", 0.2)
    worker = Worker(settings, registry, **options)
    await worker.start()
    try:
        yield worker
    finally:
        stopping = asyncio.create_task(worker.stop(5.0))
        done, _ = await asyncio.wait([stopping], timeout=SLOW_STOP_SECONDS)
        if not done:
            await stall_report(
                f"worker {worker.worker_id} still stopping after {SLOW_STOP_SECONDS:g}s",
                settings.database_url,
            )
        await stopping


async def until(
    condition: Callable[[], Awaitable[bool]], message: str, timeout: float = 20.0
) -> None:
    """Wait until ``await condition()`` holds (a read of the database, say); fail with
    ``message`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            await stall_report(message)
            raise AssertionError(message)
        await asyncio.sleep(0.05)


async def poll(condition: Callable[[], bool], message: str, timeout: float = 20.0) -> None:
    """Wait until ``condition()`` holds; fail with ``message`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            await stall_report(message)
            raise AssertionError(message)
        await asyncio.sleep(0.05)


async def abandoned_until(worker: Worker, kind: str, end: Callable[[], None]) -> None:
    """One handler of ``kind`` (thread, task) is counted abandoned and running until
    ``end()`` lets it return."""
    assert metric(worker, "taskq_abandoned_handlers_total", kind=kind) == 1
    assert metric(worker, "taskq_abandoned_handlers_running", kind=kind) == 1
    end()
    await poll(
        lambda: metric(worker, "taskq_abandoned_handlers_running", kind=kind) == 0,
        f"the abandoned {kind}'s end was not counted",
    )


def metric(worker: Worker, name: str, **labels: str) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def start_worker_process(
    settings: Settings, tmp_path: Path, *args: str, module: str = "taskq.demo", **env: str
) -> asyncio.subprocess.Process:
    """``taskq worker MODULE`` as a child process, logging to ``tmp_path``.

    ``module`` may be one of the tests' own (``tests.support.misbehaving``).
    """
    env.setdefault("PYTHONPATH", str(ROOT))
    with (tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskq",
            "worker",
            module,
            *args,
            env=subprocess_env(settings, **env),
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )


async def make_sweeper(h: Harness, **options: Any) -> tuple[Sweeper, Link]:
    """A sweeper on the harness's store and broker (its own link), not started:
    tests call its duties. Stop both when done."""
    link = Link(h.settings.amqp_url, name="test-sweeper")
    await link.start()
    await link.ready.wait()
    sweeper = Sweeper(
        h.store,
        h.publisher,
        link,
        h.names,
        h.settings.queues,
        metrics=WorkerMetrics(),
        **options,
    )
    return sweeper, link
