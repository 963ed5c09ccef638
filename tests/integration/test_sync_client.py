"""SyncClient against real Postgres and RabbitMQ: enqueues from plain threads and from a
forked child, the async client's errors raised in the caller's thread, and enqueues inside
a caller's psycopg 3 transaction (sync, and async with the async client): published by the
relay once it commits, nothing left by a rollback."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import pytest

from taskq import (
    Client,
    IdempotencyConflict,
    InvalidRequest,
    StoreError,
    SyncClient,
    UnsupportedConnection,
)
from taskq.amqp.broker import Link, Publisher
from taskq.fleet.relay import Relay
from taskq.settings import Settings
from taskq.store import Store
from tests.support.api_fixtures import drain
from tests.support.services import subprocess_env
from tests.support.worker_fixtures import harness, running_worker

pytestmark = pytest.mark.integration

MAIL_SCHEMA = {
    "type": "object",
    "properties": {"to": {"type": "string", "minLength": 3}},
    "required": ["to"],
}


@pytest.fixture
async def sync_client(settings: Settings) -> AsyncIterator[SyncClient]:
    """A SyncClient on the test's database and namespace (topology declared, types put)."""
    async with harness(settings) as h:
        await h.put_type("demo.echo")
        await h.put_type("mail.v1", payload_schema=MAIL_SCHEMA)
    client = SyncClient(settings)
    yield client
    await asyncio.to_thread(client.close)


async def in_thread(function: Callable[[], Any]) -> Any:
    """Run ``function`` in a plain thread, as sync code calls the client."""
    return await asyncio.to_thread(function)


def loop_threads() -> set[threading.Thread]:
    """The SyncClients' event-loop threads alive in this process."""
    return {t for t in threading.enumerate() if t.name == "taskq-sync-client"}


async def count_tasks(settings: Settings) -> int:
    connection = await asyncpg.connect(settings.database_url)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM taskq.tasks")
        return count
    finally:
        await connection.close()


@pytest.fixture
async def relay_by_notify(settings: Settings) -> AsyncIterator[Relay]:
    """A relay that takes owed rows only when a NOTIFY names them (its minimum age is
    an hour), so what it publishes it learnt of from a commit."""
    store = await Store.connect(settings.database_url)
    link = Link(settings.amqp_url, name="test-relay")
    await link.start()
    relay = Relay(
        store,
        settings.database_url,
        Publisher(link, settings.topology(), settings.max_delay),
        interval=0.2,
        min_age=3600,
    )
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()
        await link.stop()
        await store.close()


async def test_threads_share_one_client_and_a_worker_runs_their_tasks(
    settings: Settings, sync_client: SyncClient
) -> None:
    def enqueue_five(thread: int) -> list[uuid.UUID]:
        return [sync_client.enqueue("demo.echo", {"thread": thread, "n": n}).id for n in range(5)]

    before = loop_threads()
    async with harness(settings) as h, running_worker(settings):
        with ThreadPoolExecutor(8) as pool:
            batches = await in_thread(lambda: list(pool.map(enqueue_five, range(8))))
        ids = [task_id for batch in batches for task_id in batch]
        assert len(set(ids)) == 40
        for task_id in ids:
            await h.wait_for(task_id, "SUCCEEDED")
    assert len(loop_threads() - before) == 1  # one loop thread served all eight threads


async def test_errors_are_the_async_clients_raised_in_the_callers_thread(
    settings: Settings, sync_client: SyncClient
) -> None:
    bad: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("mail.v1", {"to": 1}, {}),  # the type's payload schema
        ("mail.v1", {}, {}),
        ("nope.v1", {}, {}),  # an unknown type
        ("demo.echo", {}, {"queue": "nowhere"}),
        ("demo.echo", {}, {"delay": -1}),
    ]
    async with Client.connect(settings) as client:
        for task_type, payload, options in bad:
            with pytest.raises(InvalidRequest) as expected:
                await client.enqueue(task_type, payload, **options)
            with pytest.raises(InvalidRequest) as raised:
                await in_thread(lambda: sync_client.enqueue(task_type, payload, **options))  # noqa: B023
            assert type(raised.value) is type(expected.value)
            assert raised.value.errors == expected.value.errors
        with pytest.raises(InvalidRequest) as expected:
            await client.enqueue_many([{"type": "demo.echo", "payload": {}}, {"type": "x"}])
        with pytest.raises(InvalidRequest) as raised:
            await in_thread(
                lambda: sync_client.enqueue_many(
                    [{"type": "demo.echo", "payload": {}}, {"type": "x"}]
                )
            )
        assert raised.value.errors == expected.value.errors
    assert await count_tasks(settings) == 0  # nothing written

    first = await in_thread(
        lambda: sync_client.enqueue("mail.v1", {"to": "a@b.c"}, idempotency_key="k")
    )
    again = await in_thread(
        lambda: sync_client.enqueue("mail.v1", {"to": "a@b.c"}, idempotency_key="k")
    )
    assert (first.created, again.created, again.id) == (True, False, first.id)
    with pytest.raises(IdempotencyConflict) as conflict:
        await in_thread(
            lambda: sync_client.enqueue("mail.v1", {"to": "x@y.z"}, idempotency_key="k")
        )
    assert conflict.value.task_id == first.id
    assert await count_tasks(settings) == 1


# A process that uses a SyncClient, forks, and enqueues from both sides, as a
# gunicorn worker forked after the app's import would. It runs as a fresh process:
# forking the test process itself would copy whatever threads and connections
# earlier tests left in it.
FORKING = """
import os, sys
from taskq import SyncClient, load_settings

client = SyncClient(load_settings())
ids = [client.enqueue("demo.echo", {"who": "parent"}).id]
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        os.write(write, str(client.enqueue("demo.echo", {"who": "child"}).id).encode())
        client.close()
        code = 0
    finally:
        os._exit(code)
os.close(write)
with os.fdopen(read) as answer:
    ids.append(answer.read())
_, status = os.waitpid(pid, 0)
if os.waitstatus_to_exitcode(status) != 0:
    sys.exit("the child could not enqueue")
ids.append(client.enqueue("demo.echo", {"who": "parent"}).id)
client.close()
print(" ".join(str(i) for i in ids))
"""


async def test_a_forked_child_connects_again_and_leaves_the_parents_connections(
    settings: Settings, sync_client: SyncClient
) -> None:
    await in_thread(lambda: sync_client.enqueue("demo.echo", {"who": "registers the type"}))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FORKING,
        env=subprocess_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()
    ids = [uuid.UUID(text) for text in out.decode().split()]
    assert len(set(ids)) == 3
    async with harness(settings) as h, running_worker(settings):
        for task_id in ids:
            row = await h.wait_for(task_id, "SUCCEEDED")
            assert row.result is not None


async def test_a_closed_client_refuses_calls(settings: Settings) -> None:
    client = SyncClient(settings)
    await in_thread(client.close)
    await in_thread(client.close)  # closing twice does nothing
    with pytest.raises(RuntimeError, match="closed"):
        await in_thread(lambda: client.enqueue("demo.echo", {}))


async def test_a_client_that_cannot_connect_says_so_and_tries_again(
    settings: Settings,
) -> None:
    unreachable = settings.model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:9/postgres"}
    )
    client = SyncClient(unreachable)
    before = loop_threads()
    for _ in range(2):
        with pytest.raises(StoreError):
            await in_thread(lambda: client.enqueue("demo.echo", {}))
    assert loop_threads() == before  # each failed start stopped its thread
    await in_thread(client.close)


async def test_psycopg_transaction_commit_publishes_and_rollback_leaves_nothing(
    settings: Settings, sync_client: SyncClient, relay_by_notify: Relay
) -> None:
    def work() -> uuid.UUID:
        with psycopg.connect(settings.database_url) as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            conn.commit()
            with pytest.raises(RuntimeError), conn.transaction():
                conn.execute("INSERT INTO orders VALUES (1)")
                sync_client.enqueue("demo.echo", {"order": 1}, connection=conn)
                raise RuntimeError("the caller's transaction fails")
            # The implicit transaction of a connection that is not in autocommit
            # (Django's outside atomic() is; inside, it is this), rolled back.
            conn.execute("INSERT INTO orders VALUES (2)")
            sync_client.enqueue("demo.echo", {"order": 2}, connection=conn)
            conn.rollback()
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (3)")
                result = sync_client.enqueue("demo.echo", {"order": 3}, connection=conn)
                assert result.created
                with psycopg.connect(settings.database_url) as other:
                    seen = other.execute("SELECT count(*) FROM taskq.tasks").fetchone()
                    assert seen == (0,)  # not visible, nor publishable, before the commit
            task_id: uuid.UUID = result.id
            return task_id

    task_id = await in_thread(work)
    messages = await drain(settings, "default", expect=1, timeout=30)
    assert [m.message_id for m in messages] == [str(task_id)]
    assert await count_tasks(settings) == 1


async def test_the_worker_runs_tasks_enqueued_in_a_psycopg_transaction(
    settings: Settings, sync_client: SyncClient
) -> None:
    def work() -> list[uuid.UUID]:
        with psycopg.connect(settings.database_url) as conn, conn.transaction():
            one = sync_client.enqueue("demo.echo", {"n": 1}, connection=conn)
            many = sync_client.enqueue_many(
                [{"type": "demo.echo", "payload": {"n": n}} for n in (2, 3)], connection=conn
            )
            return [one.id, *(r.id for r in many)]

    async with harness(settings) as h, running_worker(settings):
        ids = await in_thread(work)
        for task_id in ids:
            await h.wait_for(task_id, "SUCCEEDED")


async def test_a_large_batch_in_a_transaction_wakes_the_relay_in_several_notifications(
    settings: Settings, sync_client: SyncClient, relay_by_notify: Relay
) -> None:
    items = [{"type": "demo.echo", "payload": {"n": n}} for n in range(450)]

    def work() -> set[str]:
        with psycopg.connect(settings.database_url) as conn, conn.transaction():
            return {str(r.id) for r in sync_client.enqueue_many(items, connection=conn)}

    ids = await in_thread(work)
    messages = await drain(settings, "default", expect=450, timeout=60)
    assert {m.message_id for m in messages} == ids
    assert len(messages) == 450


async def test_bad_input_in_a_psycopg_transaction_raises_and_writes_nothing(
    settings: Settings, sync_client: SyncClient
) -> None:
    def work() -> None:
        with psycopg.connect(settings.database_url) as conn:
            with conn.transaction():
                first = sync_client.enqueue("demo.echo", {}, idempotency_key="k", connection=conn)
                with pytest.raises(InvalidRequest) as invalid:
                    sync_client.enqueue("mail.v1", {"to": 5}, connection=conn)
                # As the async client names it with connection= (it enqueues a batch of one).
                assert invalid.value.errors[0].field == "tasks[0].payload.to"
                with pytest.raises(IdempotencyConflict) as conflict:
                    sync_client.enqueue("demo.echo", {"x": 1}, idempotency_key="k", connection=conn)
                assert conflict.value.task_id == first.id
                # The caller's transaction is still usable: a refused enqueue changed nothing.
                assert conn.execute("SELECT count(*) FROM taskq.tasks").fetchone() == (1,)
            with pytest.raises(UnsupportedConnection):
                sync_client.enqueue("demo.echo", {}, connection=object())
            with pytest.raises(UnsupportedConnection, match="psycopg"):
                sync_client.enqueue("demo.echo", {}, connection=settings.database_url)
        conn.close()
        with pytest.raises(StoreError):
            sync_client.enqueue("demo.echo", {}, connection=conn)  # closed: a taskq error

    await in_thread(work)
    assert await count_tasks(settings) == 1


async def test_async_client_in_a_psycopg_async_transaction(
    settings: Settings, relay_by_notify: Relay
) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
    async with (
        Client.connect(settings) as client,
        await psycopg.AsyncConnection.connect(settings.database_url) as conn,
    ):
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await client.enqueue("demo.echo", {"n": 1}, connection=conn)
                raise RuntimeError("rolled back")
        async with conn.transaction():
            result = await client.enqueue("demo.echo", {"n": 2}, connection=conn)
    messages = await drain(settings, "default", expect=1, timeout=30)
    assert [m.message_id for m in messages] == [str(result.id)]
    assert await count_tasks(settings) == 1


async def test_a_refused_batch_leaves_none_of_its_tasks_in_the_callers_transaction(
    settings: Settings, sync_client: SyncClient
) -> None:
    batch = [
        {"type": "demo.echo", "payload": {"n": 1}},
        {"type": "demo.echo", "payload": {"other": True}, "idempotency_key": "k"},
    ]

    def work(autocommit: bool) -> None:
        with psycopg.connect(settings.database_url, autocommit=autocommit) as conn:
            with conn.transaction():
                sync_client.enqueue("demo.echo", {}, idempotency_key="k", connection=conn)
            in_transaction = conn.transaction() if not autocommit else contextlib.nullcontext()
            with in_transaction:
                with pytest.raises(IdempotencyConflict) as conflict:
                    sync_client.enqueue_many(batch, connection=conn)
                assert conflict.value.field == "tasks[1].idempotency_key"
                # The batch's first task is not kept, and the transaction goes on.
                assert conn.execute("SELECT count(*) FROM taskq.tasks").fetchone() == (1,)
                sync_client.enqueue_many(batch[:1] * 2, connection=conn)
            assert conn.execute("SELECT count(*) FROM taskq.tasks").fetchone() == (3,)
            conn.execute("TRUNCATE taskq.tasks")

    await in_thread(lambda: work(False))
    await in_thread(lambda: work(True))  # a connection in autocommit, no transaction open


async def test_a_refused_batch_in_an_asyncpg_transaction_leaves_none_of_it(
    settings: Settings,
) -> None:
    async with harness(settings) as h:
        await h.put_type("demo.echo")
    batch = [
        {"type": "demo.echo", "payload": {"n": 1}},
        {"type": "demo.echo", "payload": {"other": True}, "idempotency_key": "k"},
    ]
    async with Client.connect(settings) as client:
        await client.enqueue("demo.echo", {}, idempotency_key="k")
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                with pytest.raises(IdempotencyConflict):
                    await client.enqueue_many(batch, connection=conn)
                assert await conn.fetchval("SELECT count(*) FROM taskq.tasks") == 1
                await client.enqueue_many(batch[:1] * 2, connection=conn)
            with pytest.raises(IdempotencyConflict):  # outside a transaction: the same
                await client.enqueue_many(batch, connection=conn)
        finally:
            await conn.close()
    assert await count_tasks(settings) == 3
