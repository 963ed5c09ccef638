"""The task history partitioned by time (migration 0021, issue #19 item 1).

``task_events`` is partitioned by the time of each event: the sweeper creates
partitions ahead (``keep_history``) and retention drops whole partitions
(``drop_history``) instead of deleting every event of every task. Events of a
time no partition covers land in the default partition and move into their
partition when it is created; a drop that cannot have its lock at once gives up
and changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from taskq import sql
from taskq.amqp.broker import Link
from taskq.fleet.sweeper import Sweeper
from taskq.migrate import migrate
from taskq.settings import Settings
from taskq.store import Store
from tests.support.worker_fixtures import harness

pytestmark = pytest.mark.integration

HOUR = 3600.0
DAY = 86400.0


async def partitions(db: asyncpg.Connection) -> list[tuple[str, datetime, datetime]]:
    rows = await db.fetch("SELECT name, from_at, to_at FROM history_partitions ORDER BY from_at")
    return [(r["name"], r["from_at"], r["to_at"]) for r in rows]


async def where(db: asyncpg.Connection, event_id: int) -> str | None:
    """The partition that holds event ``event_id``."""
    found: str | None = await db.fetchval(
        "SELECT tableoid::regclass::text FROM task_events WHERE id = $1", event_id
    )
    return found.rpartition(".")[2] if found else None


async def event_at(db: asyncpg.Connection, task_id: uuid.UUID, at: datetime) -> int:
    """An event of ``task_id`` written as if at ``at``; returns its id."""
    event_id: int = await db.fetchval(
        "INSERT INTO task_events (task_id, status, attempt, at) VALUES ($1, 'ENQUEUED', 0, $2)"
        " RETURNING id",
        task_id,
        at,
    )
    return event_id


def sweeper_of(store: Store, settings: Settings, names: object, **options: float) -> Sweeper:
    link = Link(settings.amqp_url, name="unused")
    return Sweeper(store, None, link, names, settings.queues, **options)  # type: ignore[arg-type]


async def uncover_the_present(db: asyncpg.Connection) -> None:
    """Drop every partition up to two days ahead (the migration's cover): as if the
    sweeper had not run for days, events of the present go to the default partition."""
    while (await db.fetchrow("SELECT * FROM history_drop(now() + interval '3 days', 0)"))[
        "dropped"
    ]:
        pass
    assert await partitions(db) == []


async def test_the_migration_makes_the_first_partitions(db: asyncpg.Connection) -> None:
    made = await partitions(db)
    assert made[0][0] == "task_events_before"
    # Contiguous, a day at most each (on whole UTC days after the first), two days ahead.
    assert [f for _, f, _ in made[1:]] == [t for _, _, t in made[:-1]]
    assert all(t - f <= timedelta(days=1) for _, f, t in made[1:])
    assert all(t.hour == t.minute == t.second == t.microsecond == 0 for _, _, t in made[1:])
    assert made[-1][2] >= datetime.now(UTC) + timedelta(days=1, hours=23)
    event = await event_at(db, uuid.uuid4(), datetime.now(UTC))
    assert await where(db, event) not in ("task_events_default", None)


async def test_partitions_are_created_ahead_and_take_what_the_default_one_held(
    settings: Settings, db: asyncpg.Connection
) -> None:
    newest = max(t for _, _, t in await partitions(db))
    task = uuid.uuid4()
    # An event past every partition (the sweeper did not run for a while) is kept.
    stray = await event_at(db, task, newest + timedelta(hours=2, minutes=30))
    assert await where(db, stray) == "task_events_default"
    async with harness(settings) as h:
        ahead = (newest - datetime.now(UTC)).total_seconds() + 3.5 * HOUR
        assert await h.store.create_history(HOUR, ahead) == 4
        made = await partitions(db)
        assert [(f, t - f) for _, f, t in made[-4:]] == [
            (newest + timedelta(hours=n), timedelta(hours=1)) for n in range(4)
        ]
        # The stray event moved into its partition; the default holds nothing.
        assert await where(db, stray) == made[-2][0]
        assert await db.fetchval("SELECT count(*) FROM task_events_default") == 0
        assert await h.store.create_history(HOUR, ahead) == 0  # nothing more to do
        # A task's history reads across partitions, in order.
        now_event = await event_at(db, task, datetime.now(UTC))
        assert [e.id for e in await h.store.task_events(task)] == [stray, now_event]


async def test_a_partition_of_the_present_is_made_while_inserts_go_on(
    settings: Settings, db: asyncpg.Connection, database_url: str
) -> None:
    """Attaching a partition whose time has begun, beside inserts routed to the
    default partition for that time, failed them ("violates partition constraint"):
    it is made under a lock of task_events that the inserts wait for."""
    await uncover_the_present(db)
    stop = asyncio.Event()
    written: list[int] = []
    reached = {200: asyncio.Event(), 400: asyncio.Event()}

    async def insert() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                written.append(await event_at(connection, uuid.uuid4(), datetime.now(UTC)))
                for count, event in reached.items():
                    if len(written) >= count:
                        event.set()
        finally:
            await connection.close()

    inserters = [asyncio.create_task(insert()) for _ in range(4)]
    try:
        async with harness(settings) as h:
            await reached[200].wait()
            made = None
            while made is None:  # a busy lock gives up, and the sweeper tries again
                made = await h.store.create_history(60.0, 600.0)
            assert made >= 10
            await reached[400].wait()
    finally:
        stop.set()
        await asyncio.gather(*inserters)  # an insert's failure fails the test here
    # What waited in the default partition moved into the partition of the present,
    # and everything written after it was made went there.
    assert await db.fetchval("SELECT count(*) FROM task_events_default") == 0
    assert await db.fetchval("SELECT count(*) FROM task_events") == len(written)


async def test_a_long_absence_leaves_its_events_in_the_default_partition(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # More than 10,000 events wait for a partition of the present: moving them would
    # hold task_events too long, so they stay, and the partitions begin after now.
    await uncover_the_present(db)
    await db.execute(
        "INSERT INTO task_events (task_id, status, attempt)"
        " SELECT gen_random_uuid(), 'ENQUEUED', 0 FROM generate_series(1, 10001)"
    )
    async with harness(settings) as h:
        assert (await h.store.create_history(HOUR, 3.5 * HOUR) or 0) >= 3
        start = (await partitions(db))[0][1]
        assert start > datetime.now(UTC) and start.minute == start.second == 0
        assert await db.fetchval("SELECT count(*) FROM task_events_default") == 10001
        # Inserts of the present go on into the default partition.
        await event_at(db, uuid.uuid4(), datetime.now(UTC))
        assert await db.fetchval("SELECT count(*) FROM task_events_default") == 10002


async def test_retention_drops_whole_partitions_and_trims_the_default(
    settings: Settings, db: asyncpg.Connection
) -> None:
    task = uuid.uuid4()
    async with harness(settings) as h:
        old = await event_at(db, task, datetime.now(UTC) - timedelta(days=9))
        kept = await event_at(db, task, datetime.now(UTC) + timedelta(hours=1))
        assert await where(db, old) == "task_events_before"

        # Nothing has ended a retention ago yet.
        assert await h.store.drop_history(7 * DAY, 1000) == (0, 0)
        # Seen from two days on (a retention of minus two days), the oldest partition
        # goes, one a call: the old table, with its events; the later ones stay.
        assert await h.store.drop_history(-2 * DAY, 1000) == (1, 0)
        assert "task_events_before" not in [name for name, _, _ in await partitions(db)]
        assert await where(db, old) is None and await where(db, kept) is not None

        # Events that waited in the default partition past their time are deleted
        # from there, in batches.
        await db.execute(
            "INSERT INTO task_events (task_id, status, attempt, at)"
            " SELECT $1, 'ENQUEUED', 0, now() + interval '30 days' FROM generate_series(1, 3)",
            task,
        )
        left = len(await partitions(db))
        dropped = trimmed = 0
        while (outcome := await h.store.drop_history(-40 * DAY, 2)) != (0, 0):
            assert outcome is not None and outcome[1] <= 2
            dropped, trimmed = dropped + outcome[0], trimmed + outcome[1]
        assert (dropped, trimmed) == (left, 3)
        assert await partitions(db) == [] and await where(db, kept) is None


async def test_a_drop_that_cannot_have_its_lock_at_once_changes_nothing(
    settings: Settings, db: asyncpg.Connection, database_url: str
) -> None:
    async with harness(settings) as h:
        before = await partitions(db)
        reader = await asyncpg.connect(database_url)
        try:
            # A long read of the history holds the parent table.
            transaction = reader.transaction()
            await transaction.start()
            await reader.fetchval(f"SELECT count(*) FROM {settings.db_schema}.task_events")
            assert await h.store.drop_history(-2 * DAY, 1000) is None
            assert await partitions(db) == before
            await transaction.rollback()
        finally:
            await reader.close()
        assert await h.store.drop_history(-2 * DAY, 1000) == (1, 0)


async def test_the_sweeper_keeps_partitions_ahead_and_retention_drops_them(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await uncover_the_present(db)
    async with harness(settings) as h:
        sweeper = sweeper_of(h.store, settings, h.names, retention=DAY, history_partition=60.0)
        assert await sweeper.keep_history(force=True) >= 2
        # Partitions of a minute, from the present to two minutes ahead.
        made = await partitions(db)
        assert made[0][1] <= datetime.now(UTC) and made[-1][2] >= datetime.now(UTC) + timedelta(
            seconds=110
        )
        assert await sweeper.keep_history() == 0  # rests a quarter of a partition

        # Retention's pass drops what ended a retention ago: nothing here yet.
        assert await sweeper.drop_history() == 0
        sweeper.retention = -3 * DAY  # as if three days went by
        assert await sweeper.drop_history() == len(made)
        assert await partitions(db) == []


async def test_the_migration_keeps_the_events_and_their_ids_go_on(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = sql.migrations()
    monkeypatch.setattr(sql, "migrations", lambda: [m for m in everything if m.version < 21])
    await migrate(empty_database_url)
    connection = await asyncpg.connect(empty_database_url)
    try:
        tasks = [uuid.uuid4(), uuid.uuid4()]
        await connection.execute(
            "INSERT INTO taskq.task_type (name, queue) VALUES ('m.v1', 'default')"
        )
        insert = (
            "INSERT INTO taskq.tasks (id, type, queue, payload, max_attempts, timeout_seconds)"
            " VALUES ($1, 'm.v1', 'default', '{}', 3, 30)"
        )
        await connection.execute(insert, tasks[0])
        await connection.execute(
            "UPDATE taskq.tasks SET status = 'CANCELLED', finished_at = now() WHERE id = $1",
            tasks[0],
        )
        read = "SELECT id, status FROM taskq.task_events WHERE task_id = $1 ORDER BY id"
        old = [tuple(r) for r in await connection.fetch(read, tasks[0])]
        assert [status for _, status in old] == ["ENQUEUED", "CANCELLED"]

        monkeypatch.setattr(sql, "migrations", lambda: everything)
        report = await migrate(empty_database_url)
        assert report.applied == ["0021_partitioned_history"]
        kind = await connection.fetchval(
            "SELECT relkind FROM pg_class WHERE oid = 'taskq.task_events'::regclass"
        )
        assert kind in ("p", b"p")  # partitioned
        assert [tuple(r) for r in await connection.fetch(read, tasks[0])] == old
        await connection.execute(insert, tasks[1])
        [(new_id, _)] = [tuple(r) for r in await connection.fetch(read, tasks[1])]
        assert new_id > max(event_id for event_id, _ in old)
    finally:
        await connection.close()
