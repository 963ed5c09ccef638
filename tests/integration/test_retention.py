"""Retention: the sweeper deletes old terminal tasks and their progress, in bounded batches
(their events go with the history's partitions: test_history_partitions.py)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from taskq.amqp.broker import Link
from taskq.fleet import sweeper as sweeper_module
from taskq.fleet.sweeper import Sweeper
from taskq.metrics import WorkerMetrics
from taskq.settings import Settings
from tests.support.worker_fixtures import harness

pytestmark = pytest.mark.integration

DAY = 86400.0


async def add(db: asyncpg.Connection, status: str, finished_days_ago: float | None) -> uuid.UUID:
    """A task in ``status``, created 30 days ago, finished that many days ago."""
    task_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, created_at)"
        " VALUES ($1, 'r.v1', 'default', '{}', 3, 30, now() - interval '30 days')",
        task_id,
    )
    if status != "ENQUEUED":
        await db.execute(
            "UPDATE tasks SET status = $2, attempts = 1, worker_id = 'w',"
            " lease_expires_at = now() + interval '1 hour',"
            " finished_at = now() - make_interval(secs => $3) WHERE id = $1",
            task_id,
            status,
            (finished_days_ago or 0) * DAY,
        )
    return task_id


async def test_retention_deletes_only_old_terminal_tasks(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(settings) as h:
        await h.put_type("r.v1")
        old = [await add(db, s, 8) for s in ("SUCCEEDED", "FAILED", "CANCELLED")]
        young = [await add(db, s, 6) for s in ("SUCCEEDED", "FAILED", "CANCELLED")]
        live = [await add(db, "ENQUEUED", None), await add(db, "RUNNING", None)]
        # Their progress goes with them (task_progress has no foreign key).
        await h.store.write_progress([(t, 1, 1.0, None) for t in old + young])
        metrics = WorkerMetrics()
        link = Link(settings.amqp_url, name="unused")
        sweeper = Sweeper(
            h.store, h.publisher, link, h.names, settings.queues, retention=7 * DAY,
            metrics=metrics,
        )  # fmt: skip
        assert await sweeper.apply_retention(force=True) == 3
        left = {r["id"] for r in await db.fetch("SELECT id FROM tasks")}
        assert left == {*young, *live}
        # Their events stay until their partition of the history ends a retention ago
        # (tests/integration/test_history_partitions.py): here, the partition of today.
        history = "SELECT count(*) FROM task_events WHERE task_id = ANY($1::uuid[])"
        assert await db.fetchval(history, old) == 2 * len(old)
        progress = {r["task_id"] for r in await db.fetch("SELECT task_id FROM task_progress")}
        assert progress == set(young)
        assert metrics.registry.get_sample_value("taskq_retention_deleted_total") == 3
        assert await sweeper.apply_retention() == 0  # rests between runs

        # Bounded: with no time budget left, one statement of 100 per pass, and a pass
        # that ends behind wakes the next at once.
        monkeypatch.setattr(sweeper_module, "RETENTION_BATCH", 100)
        monkeypatch.setattr(sweeper_module, "RETENTION_BUDGET", 0.0)
        await db.execute(
            "INSERT INTO tasks (id, type, queue, payload, max_attempts, timeout_seconds, status,"
            " attempts, finished_at)"
            " SELECT gen_random_uuid(), 'r.v1', 'default', '{}', 3, 30, 'SUCCEEDED', 1,"
            " now() - interval '9 days' FROM generate_series(1, 250)"
        )
        assert await sweeper.apply_retention(force=True) == 100
        assert sweeper._wake.is_set()
        sweeper._wake.clear()
        assert await sweeper.apply_retention() == 100  # it was behind: no rest
        sweeper._wake.clear()
        assert await sweeper.apply_retention() == 50
        assert not sweeper._wake.is_set()  # caught up
        assert await db.fetchval("SELECT count(*) FROM tasks") == len(young) + len(live)

        # 0 keeps everything.
        sweeper.retention = 0
        await db.execute("UPDATE tasks SET finished_at = now() - interval '99 days'"
                         " WHERE finished_at IS NOT NULL")  # fmt: skip
        assert await sweeper.apply_retention(force=True) == 0
