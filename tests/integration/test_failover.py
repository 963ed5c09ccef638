"""taskq's database connections across a failover: primary gone, standby promoted.

A private primary and synchronous standby (:mod:`tests.support.private_replication`);
every part of taskq that opens its own connections is given both hosts with
``target_session_attrs=read-write``: the store's pool, a leader's lock session,
a LISTEN connection and ``taskq migrate``. With the primary stopped and the standby
not yet promoted, each fails with :class:`StoreError` (which the API answers 503,
the leaders and workers retry), never with a driver error of its own; once the
standby is promoted each works again on it, without being rebuilt.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from taskq.errors import StoreError
from taskq.fleet.leader import SessionLock
from taskq.migrate import migrate
from taskq.store import NewTask, Store, listen, open_connection
from tests.support.private_replication import PrivatePair, private_pair

__all__ = ["private_pair"]  # a fixture, used by name

pytestmark = pytest.mark.integration

LOCK_KEY = 0x66616C6F  # an arbitrary advisory lock key of this test's


async def put_type(store: Store) -> None:
    await store.put_task_type(
        "demo.echo",
        queue="default",
        max_attempts=3,
        timeout_seconds=30,
        backoff_json=None,
        payload_schema_json=None,
        enabled=True,
    )


async def test_every_connection_fails_as_store_error_then_finds_the_promoted_standby(
    private_pair: PrivatePair,
) -> None:
    pair = private_pair
    url = pair.url("taskq_failover")
    await migrate(url)  # creates the database on the primary; the standby replays it
    store = await Store.connect(url)
    lock = SessionLock(url, LOCK_KEY, "test")
    try:
        await put_type(store)
        before = uuid.uuid4()
        await store.enqueue([NewTask(before, "demo.echo", "{}")])  # a synchronous commit
        assert await lock.hold()
        listener = await listen(url, "taskq_failover", lambda _: None, lambda: None, name="t")
        await listener.close()

        pair.primary.stop("immediate")
        # The pool's connections died with the primary; new ones find no writable host.
        for _ in range(2):
            with pytest.raises(StoreError):
                await store.ping()
        with pytest.raises(StoreError):
            await store.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}")])
        with pytest.raises(StoreError):
            await Store.connect(url)
        with pytest.raises(StoreError):
            await lock.hold()
        assert not lock.held
        with pytest.raises(StoreError):
            await listen(url, "taskq_failover", lambda _: None, lambda: None, name="t")
        with pytest.raises(StoreError):
            await migrate(url)
        # Only the standby reachable, and it is read-only: asyncpg says no host
        # matches (TargetServerAttributeNotMatched); taskq says the database is down.
        standby_only = (
            f"postgresql://postgres@127.0.0.1:{pair.standby.port}/taskq_failover"
            "?target_session_attrs=read-write"
        )
        with pytest.raises(StoreError, match="cannot connect"):
            await migrate(standby_only)
        with pytest.raises(StoreError):
            await Store.connect(standby_only)
        # Given the standby's own URL (no target_session_attrs) a write is refused
        # as read-only: a StoreError too (503), not data refused for good (400).
        direct = await Store.connect(pair.standby.server_url.rsplit("/", 1)[0] + "/taskq_failover")
        try:
            with pytest.raises(StoreError, match="read-only") as refused:
                await direct.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}")])
            assert type(refused.value) is StoreError
        finally:
            await direct.close()

        pair.promote()
        # The same pool, lock and URL work again, on the new primary.
        await store.ping()
        after = uuid.uuid4()
        await store.enqueue([NewTask(after, "demo.echo", "{}")])
        assert await lock.hold()
        assert lock.connection is not None
        listener = await listen(url, "taskq_failover", lambda _: None, lambda: None, name="t")
        await listener.close()
        assert (await migrate(url)).applied == []
        connection = await asyncpg.connect(url)
        try:
            assert connection._addr[1] == pair.standby.port
            found = await connection.fetchval(
                "SELECT count(*) FROM taskq.tasks WHERE id = ANY($1::uuid[])", [before, after]
            )
        finally:
            await connection.close()
        assert found == 2  # the commit before the crash reached the standby
    finally:
        await lock.release()
        await store.close()


async def test_a_frozen_primary_does_not_hide_the_promoted_standby(
    private_pair: PrivatePair,
) -> None:
    """The primary stops answering (SIGSTOP: connects to it never complete) and the
    standby is promoted: asyncpg alone spends its whole connect timeout on the first
    host and never tries the second; taskq's connections try both at once."""
    pair = private_pair
    url = pair.url("taskq_failover")
    await migrate(url)
    store = await Store.connect(url)
    lock = SessionLock(url, LOCK_KEY, "test")
    try:
        await put_type(store)
        assert await lock.hold()
        pair.freeze()
        # No host accepts writes: the frozen one times out, the standby is read-only.
        with pytest.raises(StoreError):
            await listen(url, "taskq_failover", lambda _: None, lambda: None, name="t")
        pair.promote()
        # What this test is about: asyncpg's own multi-host connect still fails.
        with pytest.raises(TimeoutError):
            await asyncpg.connect(url, timeout=2)
        connection = await open_connection(url, timeout=2)
        try:
            assert connection._addr[1] == pair.standby.port
        finally:
            await connection.close()
        listener = await listen(url, "taskq_failover", lambda _: None, lambda: None, name="t")
        await listener.close()
        # The lock's session (on the frozen primary) fails its check, then the
        # lock is taken on the new primary.
        with pytest.raises(StoreError):
            await lock.hold()
        assert await lock.hold()
        # A pool made now works at once.
        fresh = await Store.connect(url)
        try:
            await fresh.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}")])
        finally:
            await fresh.close()
        # The pool's first statement meets a connection to the frozen primary and
        # times out; the pool then retires its other connections (one more is
        # open: min_size 2), so the next statement runs on a new one.
        with pytest.raises(StoreError):
            await store.ping()
        await store.ping()
        await store.enqueue([NewTask(uuid.uuid4(), "demo.echo", "{}")])
    finally:
        pair.thaw()
        await lock.release()
        await store.close()
