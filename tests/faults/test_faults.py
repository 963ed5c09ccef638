"""The README's promises under faults: real worker and API processes, killed and starved.

Scenarios (numbered as in issue 6):

1. worker crashes: two workers, one SIGKILLed every ~2 s and restarted;
4. the API dies between commit and publish: SIGKILL mid-burst, the relay publishes;
5. the broker loses messages: a work queue and a delay queue purged under load;
6. poison and hostile envelopes published straight into a work queue.

Each ends with the same audit: every accepted task is terminal, no task has two
SUCCEEDED events, nothing is stuck RUNNING or ENQUEUED past its due time; and
prints its figures (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx
import pytest

from taskq.amqp.envelope import Envelope
from taskq.client import Client
from taskq.fleet.relay import HEADER_REASON
from taskq.settings import Settings
from taskq.store import NewTask
from tests.support.faults import (
    KILL_AT,
    all_terminal,
    audit,
    eventually,
    kill_as_work_progresses,
    processes,
    queue_depth,
    statuses,
    worker_ready,
)
from tests.support.services import free_port
from tests.support.worker_fixtures import Harness, harness

pytestmark = [pytest.mark.fault, pytest.mark.integration]

# ---------------------------------------------------------------------- helpers


async def purge(h: Harness, name: str) -> int:
    channel = await h.connection.channel()
    try:
        queue = await channel.get_queue(name, ensure=False)
        result = await queue.purge()
        return int(result.message_count or 0)
    finally:
        await channel.close()


async def enqueue_records(
    client: Client, count: int, *, seconds: float = 0.0, delay: float | None = None
) -> list[uuid.UUID]:
    """Enqueue ``count`` ``demo.record`` tasks through the batch path; returns their ids."""
    ids: list[uuid.UUID] = []
    for start in range(0, count, 500):
        item: dict[str, Any] = {
            "type": "demo.record",
            "payload": {"seconds": seconds} if seconds else {},
            "max_attempts": 20,  # killed attempts count; the promise is about loss, not attempts
        }
        if delay is not None:
            item["delay"] = delay
        results = await client.enqueue_many([item] * min(500, count - start))
        ids.extend(uuid.UUID(str(r.id)) for r in results)
    return ids


async def all_published(db: asyncpg.Connection, ids: list[uuid.UUID]) -> bool:
    owed = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND published_at IS NULL", ids
    )
    return bool(owed == 0)


class StallingProxy:
    """A TCP proxy that can :meth:`stall`: it keeps the connections but forwards nothing.

    Publishes through it are sent but never confirmed, so the process behind it
    holds committed tasks whose publish is still to come.
    """

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self.url = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self.url)
        self.url = parts._replace(
            netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}"
        ).geturl()

    async def __aenter__(self) -> StallingProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stall(self) -> None:
        self.flowing.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


# ---------------------------------------------------------------------- scenario 1


async def test_worker_crashes_lose_nothing_and_succeed_once(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """Two workers run 2,000 tasks; one of them is SIGKILLed and restarted as the work
    progresses (at 10 to 70 % of it done, tests.support.faults.kill_as_work_progresses).

    The workers run 16 tasks at once each (not the default 100): the 2,000 tasks
    of 0.2 s then last about 12 s."""
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        await h.put_type("demo.record", timeout=60)
        workers = [await procs.worker("--concurrency", "16") for _ in range(2)]
        await worker_ready(h, 2)
        client = await Client.connect(settings)
        try:
            ids = await enqueue_records(client, 2000, seconds=0.2)
        finally:
            await client.close()

        async def start() -> asyncio.subprocess.Process:
            return await procs.worker("--concurrency", "16")

        async def done() -> int:
            return (await statuses(db, ids)).get("SUCCEEDED", 0)

        kills = await kill_as_work_progresses(procs, workers, start, done, len(ids))
        assert kills == len(KILL_AT), f"only {kills} kills: the work stopped progressing"
        await all_terminal(db, ids, timeout=60)
        figures = await audit(db, ids, "1 worker crashes", faults=kills)
        for worker in workers:
            await procs.stop(worker)
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert figures.executions >= len(ids)
    recovered = await db.fetchval(
        "SELECT count(DISTINCT task_id) FROM task_events"
        " WHERE error LIKE 'lease expired: worker %' AND task_id = ANY($1::uuid[])",
        ids,
    )
    print(f"[fault] 1 worker crashes: tasks taken back after a kill = {recovered}")
    assert recovered > 0, "no kill hit a running task: the scenario proved nothing"


# ---------------------------------------------------------------------- scenario 4


async def test_api_killed_between_commit_and_publish_loses_nothing(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """SIGKILL ``taskq api`` during a burst: what it committed is published by a relay.

    Its broker connection runs through a proxy that stalls just before the kill,
    so that publishes are surely in flight (committed, answered 201, unconfirmed)
    when the process dies, not only by the luck of the timing.
    """
    async with (
        StallingProxy(settings.amqp_url) as proxy,
        harness(settings) as h,
        processes(settings, tmp_path) as procs,
    ):
        await h.put_type("demo.record", timeout=60)
        port = free_port()
        api = await procs.start("api", "--port", str(port), TASKQ_AMQP_URL=proxy.url)
        accepted: list[uuid.UUID] = []
        failed_requests = 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(up, 30, "the API answering /healthz")
            marker = uuid.uuid4().hex

            async def client(n: int) -> None:
                nonlocal failed_requests
                for i in range(10_000):
                    body = {"type": "demo.record", "payload": {"run": marker, "n": n, "i": i}}
                    try:
                        response = await http.post("/enqueue", json=body)
                    except httpx.TransportError:
                        failed_requests += 1
                        return  # the API is gone
                    assert response.status_code == 201, response.text
                    accepted.append(uuid.UUID(response.json()["id"]))

            burst = [asyncio.create_task(client(n)) for n in range(48)]
            await eventually(lambda: _at_least(accepted, 400), 60, "400 tasks accepted", 0.01)
            proxy.stall()
            await eventually(lambda: _at_least(accepted, 800), 60, "800 tasks accepted", 0.01)
            api.kill()  # SIGKILL mid-burst: no drain, no relay, no goodbye
            await api.wait()
            await asyncio.gather(*burst)
        committed: list[uuid.UUID] = [
            row["id"]
            for row in await db.fetch("SELECT id FROM tasks WHERE payload->>'run' = $1", marker)
        ]
        owed_at_kill = await db.fetchval(
            "SELECT count(*) FROM tasks WHERE payload->>'run' = $1 AND published_at IS NULL",
            marker,
        )
        unanswered = sorted(set(committed) - set(accepted))
        assert set(accepted) <= set(committed), "a 201 was answered for a task not in Postgres"
        # Only now a worker: its relay publishes what the API owed (after the grace
        # period), and it runs everything.
        worker = await procs.worker()
        await all_terminal(db, committed, timeout=60)
        extra = {
            "answered 201": len(accepted),
            "committed without a 201": len(unanswered),
            "unpublished at the kill": owed_at_kill,
            "requests cut": failed_requests,
        }
        figures = await audit(db, committed, "4 API killed mid-burst", faults=1, extra=extra)
        await procs.stop(worker)
    assert owed_at_kill > 0, "every publish was done before the kill: nothing for the relay"
    assert figures.statuses == {"SUCCEEDED": len(committed)}
    assert figures.executions == len(committed)


async def _at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count


# ---------------------------------------------------------------------- scenario 5


async def test_messages_the_broker_lost_are_published_again(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """Purge a work queue and a delay queue with envelopes in them; the sweeper republishes."""
    # An 8 s delay waits in level 3 (8 s) only: time enough to purge it there.
    delay_queue = settings.topology().names.delay(3)
    work_queue = settings.topology().names.queue("default")
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        await h.put_type("demo.record", timeout=60)
        client = await Client.connect(settings)
        try:
            # No worker yet: the envelopes sit in the queues.
            immediate = await enqueue_records(client, 400)
            delayed = await enqueue_records(client, 300, delay=8)
            await eventually(lambda: all_published(db, immediate + delayed), 10, "published")

            async def sitting() -> bool:
                return (await queue_depth(h, work_queue))[0] == len(immediate) and (
                    await queue_depth(h, delay_queue)
                )[0] == len(delayed)

            await eventually(sitting, 5, "envelopes sitting in the work and delay queues", 0.05)
            purged = await purge(h, delay_queue) + await purge(h, work_queue)
            # Under load: a worker starts and more tasks keep coming while it recovers.
            worker = await procs.worker("--concurrency", "8")
            more: list[uuid.UUID] = []
            for _ in range(10):
                more += await enqueue_records(client, 50, seconds=0.01)
                await asyncio.sleep(0.2)
        finally:
            await client.close()
        ids = immediate + delayed + more
        await all_terminal(db, ids, timeout=60)
        figures = await audit(
            db, ids, "5 broker lost messages", faults=2, extra={"envelopes purged": purged}
        )
        await procs.stop(worker)
        republished = [
            line
            for line in procs.log_lines()
            if "overdue: publishing them again" in line["message"]
        ]
    print(f"[fault] 5 broker lost messages: sweeper republish passes = {len(republished)}")
    assert purged == len(immediate) + len(delayed)
    assert republished, "the sweeper never noticed the lost envelopes"
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert figures.executions == len(ids)


# ---------------------------------------------------------------------- scenario 6


async def test_poison_and_hostile_envelopes_never_block(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """Garbage, forged and mismatched envelopes straight into a work queue; the worker goes on.

    The worker buffers at most 4 envelopes (``--prefetch 4``), fewer than the
    hostile ones, so a delivery left unsettled by any of them would block it.
    """
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        await h.put_type("demo.record", timeout=60)
        worker = await procs.worker("--prefetch", "4")
        await worker_ready(h)
        channel = await h.connection.channel()
        exchange = await channel.get_exchange(h.names.direct, ensure=False)

        async def publish(body: bytes, **properties: Any) -> None:
            await exchange.publish(aio_pika.Message(body, **properties), "default")

        async def unpublished_task() -> uuid.UUID:
            """A task in Postgres whose envelope the test alone will publish."""
            task_id = uuid.uuid4()
            [result] = await h.store.enqueue([NewTask(task_id, "demo.record", "{}")])
            assert result.outcome == "created"
            await h.store.mark_published([(task_id, 0)])  # keep the relay off it
            return task_id

        forged_death = await unpublished_task()
        mismatched = await unpublished_task()
        finished = await h.enqueue("demo.record")
        await h.wait_for(finished, "SUCCEEDED")
        poison = {
            "non-JSON": b"\x00\xff\xfe not JSON at all",
            "wrong fields": json.dumps({"task": str(uuid.uuid4()), "kind": "demo.record"}).encode(),
            "wrong types": json.dumps({"id": str(uuid.uuid4()), "type": 7, "attempt": -1}).encode(),
            "10 MB body": b"{" + b" " * (10 * 1024 * 1024) + b"}",
            "nested 2,000 deep": b"[" * 2000 + b"]" * 2000,
            # Well-formed but for values no real envelope has, which fit no AMQP
            # header or property were taskq to dead-letter them itself.
            "attempt 2**70": Envelope(uuid.uuid4(), "demo.record", 2**70).body(),
            "type of 1,000 bytes": Envelope(uuid.uuid4(), "t" * 1000, 0).body(),
        }
        ghost = Envelope(uuid.uuid4(), "demo.record", 0)  # no such task
        try:
            for body in poison.values():
                await publish(body)
            await publish(ghost.body())
            # A forged x-death on a valid envelope: taskq counts attempts in Postgres.
            death = [{"count": 99, "reason": "rejected", "queue": "x", "exchange": ""}]
            await publish(
                Envelope(forged_death, "demo.record", 0).body(), headers={"x-death": death}
            )
            # Attempt and type disagree with the row: the row decides what runs.
            await publish(Envelope(mismatched, "demo.fail", 7).body())
            # A replay of a finished task's envelope, with a later attempt.
            await publish(Envelope(finished, "demo.record", 5).body())
            after = await h.enqueue("demo.record")
        finally:
            await channel.close()
        await h.wait_for(after, "SUCCEEDED", timeout=30)
        for task_id in (forged_death, mismatched):
            await h.wait_for(task_id, "SUCCEEDED", timeout=30)
        expected = len(poison) + 1
        letters = await h.dead_letters(expected, timeout=20)
        await asyncio.sleep(0.5)  # nothing else may reach the DLQ
        letters += await h.dead_letters(10, timeout=0.3)
        ids = [forged_death, mismatched, finished, after]
        extra = {"dead-lettered": len(letters)}
        faults = expected + 3
        figures = await audit(db, ids, "6 poison envelopes", faults=faults, extra=extra)
        depth, consumers = await queue_depth(h, h.names.queue("default"))
        await procs.stop(worker)
        lines = procs.log_lines()
        messages = [line["message"] for line in lines]
    assert sorted(letter.body for letter in letters) == sorted([*poison.values(), ghost.body()])
    for letter in letters:
        if letter.body == ghost.body():
            # Dead-lettered by the worker itself, saying why.
            assert letter.headers[HEADER_REASON] == f"NoTask: no task with id {ghost.id}"
        else:
            # Rejected by the worker, dead-lettered by the work queue's DLX.
            assert letter.headers["x-first-death-reason"] == "rejected"
            assert letter.headers["x-first-death-queue"] == h.names.queue("default")
    invalid = [m for m in messages if m.startswith("rejected an invalid envelope")]
    assert len(invalid) == len(poison), invalid
    assert any(f"envelope for unknown task {ghost.id}" in m for m in messages)
    assert not [line for line in lines if line["level"] == "ERROR"], "errors in the worker log"
    assert (depth, consumers) == (0, 1), "the worker stopped consuming"
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    # Each real task ran exactly once, whatever its envelopes claimed.
    assert figures.executions == len(ids)
    assert await h_task_attempts(db, mismatched) == (1, "demo.record")


async def h_task_attempts(db: asyncpg.Connection, task_id: uuid.UUID) -> tuple[int, str]:
    row = await db.fetchrow("SELECT attempts, type FROM tasks WHERE id = $1", task_id)
    assert row is not None
    return row["attempts"], row["type"]
