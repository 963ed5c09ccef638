"""The sweeper: fleet duties that one process at a time runs on every pass (its leader).

- :meth:`Sweeper.recover_expired` takes back claims whose lease expired (the
  worker was killed or hangs): back to ENQUEUED and published at once, or
  FAILED and dead-lettered when no attempt is left.
- :meth:`Sweeper.republish_lost` finds work queues that report no ready
  message while Postgres holds ENQUEUED tasks for them that were published and
  due more than ``overdue_after`` seconds ago: the broker lost those envelopes
  (a queue was purged or deleted, a node lost its disk), so their publishes are
  marked owed again and the relay sends them in the same pass. An envelope
  that was not lost after all (held unacked by a busy worker) becomes a
  duplicate, which the claim drops.
- :meth:`Sweeper.end_purges` ends the queue purges begun more than a minute
  ago and never ended (the API process or the database failed between the
  broker purge and its last step): the purged queue's ENQUEUED tasks that are
  due may have lost their envelope, so their publishes are owed again.
- :meth:`Scheduler.fire_due <taskq.fleet.scheduler.Scheduler.fire_due>` enqueues
  the fires of the schedules that are due (:mod:`taskq.fleet.scheduler`).
- :meth:`Sweeper.repair_waiting` releases the WAITING tasks whose release was
  missed: those waiting for a concurrency slot of a key with room (fewer running
  than its limit, counting the tasks released and on their way to a slot),
  which a release can miss (it skips rows other transactions hold, and gives up
  after a few tries; a claim reading an old limit may park tasks as the limit
  is raised), and those a
  pause parked whose type is not paused (a resume's process died before its
  releases). They are released as a freed slot or a resume releases them. One
  index-only probe when nothing waits; at most ``repair_keys`` keys per pass.
  It also decides again the workflow nodes whose release or cancel the settle
  trigger skipped (noted in ``workflow_missed``, migration 0020).
- :meth:`Sweeper.apply_retention` deletes terminal tasks (their events go with
  them) that finished more than ``retention`` seconds ago, in bounded batches,
  and forgets workers silent for an hour and rate limit buckets idle for a
  minute (one per key can add up: a bucket whose slots are past is as good as
  none).

Workers run it with :meth:`Sweeper.start` (built with a ``database_url``):
under a Postgres advisory lock of its own, so one sweeper is active across the
fleet, whichever process holds the relay's lock (the API runs a relay too). Its duties also fit
``Relay(..., duties=sweeper.duties)``. Either way an active relay publishes
what the sweeper marks owed, as it publishes rows that were never published and
retries whose publish failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from taskq.amqp.broker import Link, Publisher
from taskq.amqp.topology import Names
from taskq.errors import BrokerError, ConfigError
from taskq.fleet.leader import SessionLock, lead, lock_key
from taskq.fleet.relay import publish_owed
from taskq.fleet.scheduler import Scheduler
from taskq.metrics import WorkerMetrics
from taskq.model import DeadLetterReason, TaskStatus
from taskq.service import Service
from taskq.store import Store

log = logging.getLogger("taskq.sweeper")

_BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError, BrokerError)

# pg_advisory_lock key of the active sweeper: "sweep" in ASCII.
LOCK_KEY = 0x7377656570

# Retention deletes at most this many tasks per statement, and goes on with more
# statements while they come back full, for RETENTION_BUDGET seconds of a pass; a
# pass that ends still behind starts the next pass at once, so that retention keeps
# up with any rate the database can take (the other duties run between). Once a
# batch is not full, it rests (retention_rest: RETENTION_EVERY seconds, less for a
# short retention).
RETENTION_BATCH = 1000
RETENTION_BUDGET = 0.5
RETENTION_EVERY = 30.0
# The task history's partitions (migration 0021): those up to two partition
# lengths ahead exist, checked every HISTORY_EVERY seconds (a quarter of a shorter
# partition); retention drops at most HISTORY_DROPS partitions a pass.
HISTORY_EVERY = 60.0
HISTORY_DROPS = 10
# Workers silent this long are deleted from the worker list (they died uncleanly).
WORKERS_FORGOTTEN_AFTER = 3600.0
# Rate limit buckets whose slots are all this long past are deleted.
BUCKETS_FORGOTTEN_AFTER = 60.0
# A queue purge not ended this many seconds after it began is ended by the sweeper.
PURGE_ENDED_AFTER = 60.0
# Seconds between the passes that look for missed releases of WAITING tasks, and the
# most concurrency keys one such pass reads (the next pass goes on from there).
REPAIR_EVERY = 5.0
REPAIR_KEYS = 1000


def retention_rest(retention: float) -> float:
    """Seconds retention rests once it has caught up: :data:`RETENTION_EVERY`, or a
    quarter of a retention shorter than two minutes (at least a second), so that no
    finished task outlives its retention by much more than that. A retention of 0
    (keep everything) rests the full time: the pass still prunes the worker list."""
    if retention <= 0:
        return RETENTION_EVERY
    return min(RETENTION_EVERY, max(1.0, retention / 4))


class Sweeper(Service):
    """Lease recovery and lost-envelope detection.

    Args:
        store: the database.
        publisher: publishes recovered tasks.
        link: the broker connection used to read queue depths.
        names: the namespace's names.
        queues: the work queues to watch (short names).
        overdue_after: seconds an ENQUEUED task must be both due and published
            before an empty work queue makes it count as lost.
        check_every: seconds between lost-envelope checks (each costs one
            passive queue declare per queue).
        batch: the most rows one duty takes per pass.
        retention: seconds after which finished tasks are deleted; 0 keeps them.
        history_partition: the length in seconds of each partition of the task
            history (``task_events``) that :meth:`keep_history` creates.
        purge_ended_after: seconds after which a queue purge not ended is ended here.
        repair_every: seconds between the looks for WAITING tasks whose release was missed.
        repair_keys: the most concurrency keys with waiting tasks one such look reads.
        metrics: counts lease recoveries, republishes and deletions, if given.
        database_url: for the dedicated connection that holds the sweeper lock;
            needed by :meth:`start` only (``Relay(duties=sweeper.duties)`` runs
            the duties under the relay's lock instead).
        interval: seconds between passes once started.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        link: Link,
        names: Names,
        queues: Sequence[str],
        *,
        overdue_after: float = 60.0,
        check_every: float = 5.0,
        batch: int = 500,
        retention: float = 7 * 86400.0,
        history_partition: float = 86400.0,
        purge_ended_after: float = PURGE_ENDED_AFTER,
        repair_every: float = REPAIR_EVERY,
        repair_keys: int = REPAIR_KEYS,
        metrics: WorkerMetrics | None = None,
        database_url: str | None = None,
        interval: float = 1.0,
    ) -> None:
        self.retention = retention
        self.history_partition = history_partition
        self._history_at = -1e9
        self.purge_ended_after = purge_ended_after
        self._retention_at = -1e9
        self.repair_every = repair_every
        self.repair_keys = repair_keys
        self._repaired_at = -1e9
        # Where the next look for missed releases goes on: after this (type, key).
        self._repair_after = ("", "")
        self.store = store
        self.publisher = publisher
        self.link = link
        self.names = names
        self.queues = list(queues)
        self.overdue_after = overdue_after
        self.check_every = check_every
        self.batch = batch
        self.metrics = metrics
        self.scheduler = Scheduler(store, publisher, metrics=metrics, on_next=self._wake_at)
        # Set to start a pass before the interval is over: at a schedule's next fire.
        self._wake = asyncio.Event()
        self._wake_timer: asyncio.TimerHandle | None = None
        self._channel: AbstractChannel | None = None
        self._checked_at = -1e9
        self.interval = interval
        self._lock = (
            None
            if database_url is None
            else SessionLock(database_url, lock_key(LOCK_KEY, store.schema), "sweeper")
        )

    name = "taskq-sweeper"

    async def _start(self) -> None:
        """Run the duties every ``interval`` seconds while this process holds the sweeper lock.

        Raises:
            ConfigError: the sweeper was built without a ``database_url``.
        """
        lock = self._lock
        if lock is None:
            raise ConfigError("database_url", "a sweeper started on its own needs one")

        async def sweep() -> None:
            for duty in self.duties:
                await lock.ensure()  # a process resumed after a freeze may have lost it
                await duty()

        self._spawn(lead(lock, sweep, interval=self.interval, wake=self._wake))

    def _wake_at(self, seconds: float | None) -> None:
        """Start the next pass in ``seconds`` if that comes before the interval is over."""
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        if seconds is not None and seconds < self.interval:
            loop = asyncio.get_running_loop()
            self._wake_timer = loop.call_later(max(0.0, seconds), self._wake.set)

    @property
    def active(self) -> bool:
        """Whether this process is the active sweeper."""
        return self._lock is not None and self._lock.held

    @property
    def duties(self) -> list[Callable[[], Awaitable[Any]]]:
        """The coroutines for ``Relay(duties=...)``."""
        return [
            self.scheduler.fire_due,
            self.recover_expired,
            self.republish_lost,
            self.end_purges,
            self.repair_waiting,
            self.keep_history,
            self.apply_retention,
        ]

    async def repair_waiting(self, *, force: bool = False) -> int:
        """Release WAITING tasks whose release was missed; returns how many.

        Every ``repair_every`` seconds (or when ``force``): nothing but an
        index-only probe while no task waits. Otherwise it reads the next
        ``repair_keys`` keys with tasks waiting for a slot (from where the last
        look stopped, around again at the end) and releases the tasks of those
        with room through the store's release of free slots, which locks the
        slots and decides again; then the types resumed with tasks still parked.
        """
        if not force and time.monotonic() - self._repaired_at < self.repair_every:
            return 0
        self._repaired_at = time.monotonic()
        repaired = await self._repair_workflows()
        if not await self.store.waiting_any():
            self._repair_after = ("", "")
            return repaired
        keys = await self.store.waiting_keys(self._repair_after, self.repair_keys)
        full = len(keys) >= self.repair_keys
        self._repair_after = (keys[-1][0], keys[-1][1]) if full else ("", "")
        by_type: dict[str, list[str]] = {}
        for task_type, key, room in keys:
            if room:
                by_type.setdefault(task_type, []).append(key)
        promoted = 0
        for task_type, names in by_type.items():
            promoted += await self.store.promote_type(task_type, names)
        resumed = 0
        for task_type in await self.store.waiting_resumed_types():
            resumed += await self.store.release_paused(task_type, batches=1)
        for reason, count in (("concurrency", promoted), ("paused", resumed)):
            if count:
                log.warning("%d WAITING tasks (%s) missed their release: released", count, reason)
                if self.metrics is not None:
                    self.metrics.waiting_repaired.labels(reason).inc(count)
        return repaired + promoted + resumed

    async def _repair_workflows(self) -> int:
        """Release or cancel the workflow nodes the settle trigger had to skip (held by
        another transaction when their parents ended), at most ``repair_keys`` per
        pass; one probe of an empty table while none was skipped."""
        if not await self.store.workflow_missed_any():
            return 0
        released, cancelled = await self.store.repair_workflows(self.repair_keys)
        for reason, what, count in (
            ("parents", "release", released),
            ("workflow_cancel", "cancel", cancelled),
        ):
            if count:
                log.warning("%d workflow nodes missed their %s: done now", count, what)
                if self.metrics is not None:
                    self.metrics.waiting_repaired.labels(reason).inc(count)
        return released + cancelled

    async def recover_expired(self) -> int:
        """Take back claims whose lease expired and publish them; returns how many."""
        rows = await self.store.recover_expired(self.batch)
        if not rows:
            return 0
        for row in rows:
            log.warning(
                "task %s: lease expired, %s",
                row.id,
                "failed: no attempt left" if row.status == TaskStatus.FAILED else "enqueued again",
                extra={"task_id": str(row.id), "task_type": row.type},
            )
        if self.metrics is not None:
            self.metrics.lease_recoveries.inc(len(rows))
            for row in rows:
                if row.status == TaskStatus.FAILED:
                    self.metrics.dead_lettered.labels(row.queue, DeadLetterReason.EXHAUSTED).inc()
        # Unpublished ones stay owed; the relay's pass after the grace period sends them.
        # A task whose cancel was requested is CANCELLED now: nothing is owed.
        owed = [row for row in rows if row.status != TaskStatus.CANCELLED]
        set_aside = self.metrics.set_aside if self.metrics is not None else None
        await publish_owed(self.store, self.publisher, owed, set_aside=set_aside)
        return len(rows)

    async def end_purges(self) -> int:
        """Owe again the publishes that purges never ended may have dropped; returns
        how many purges it ended."""
        purges = await self.store.unfinished_purges(self.purge_ended_after)
        for purge in purges:
            owed = await self.store.republish_queue(purge.queue)
            await self.store.end_purge(purge.id)
            log.warning(
                "a purge of work queue %s never ended (its process or the database failed):"
                " %d tasks of it are published again",
                self.names.queue(purge.queue),
                owed,
            )
        return len(purges)

    async def keep_history(self, *, force: bool = False) -> int:
        """Create the task history's partitions up to two partition lengths ahead;
        returns how many it created.

        Every :data:`HISTORY_EVERY` seconds (a quarter of a shorter partition), or
        when ``force``. A partition whose creation waited too long for a lock is
        created at a later pass (the default partition takes its events meanwhile).
        """
        every = min(HISTORY_EVERY, self.history_partition / 4)
        if not force and time.monotonic() - self._history_at < every:
            return 0
        self._history_at = time.monotonic()
        created = await self.store.create_history(
            self.history_partition, 2 * self.history_partition
        )
        if created is None:
            log.info("task history partitions not created this pass: a lock was busy")
            self._history_at = -1e9
            return 0
        if created:
            log.info("created %d partitions of the task history", created)
        return created

    async def apply_retention(self, *, force: bool = False) -> int:
        """Delete tasks finished longer than ``retention`` ago; returns how many.

        Bounded statements of :data:`RETENTION_BATCH` for at most
        :data:`RETENTION_BUDGET` seconds per pass, so a large backlog is worked off
        over several passes without long locks; a pass that ends behind wakes the
        next at once. Runs every :func:`retention_rest` seconds unless behind (or
        ``force``).
        """
        if not force and time.monotonic() - self._retention_at < retention_rest(self.retention):
            return 0
        self._retention_at = time.monotonic()
        await self.store.prune_workers(WORKERS_FORGOTTEN_AFTER)
        await self.store.prune_rate_buckets(BUCKETS_FORGOTTEN_AFTER, RETENTION_BATCH)
        if self.retention <= 0:
            return 0
        total = 0
        began = time.monotonic()
        while True:
            deleted = await self.store.delete_finished(self.retention, RETENTION_BATCH)
            total += deleted
            if deleted < RETENTION_BATCH:
                break
            if time.monotonic() - began >= RETENTION_BUDGET:
                self._retention_at = -1e9  # behind: go on at the next pass, at once
                self._wake.set()
                break
        await self.store.prune_workflows(self.retention, RETENTION_BATCH)
        await self.drop_history()
        if total:
            log.info("retention deleted %d finished tasks", total)
            if self.metrics is not None:
                self.metrics.retention_deleted.inc(total)
        return total

    async def drop_history(self) -> int:
        """Drop the task history's partitions that ended more than ``retention`` ago
        (at most :data:`HISTORY_DROPS`); returns how many. A drop that waited too
        long for its lock is tried again at the next pass."""
        dropped = 0
        for _ in range(HISTORY_DROPS):
            outcome = await self.store.drop_history(self.retention, RETENTION_BATCH)
            if outcome is None:
                log.info("a task history partition not dropped this pass: a lock was busy")
                self._retention_at = -1e9  # try again at the next pass
                break
            gone, trimmed = outcome
            dropped += gone
            if not gone and trimmed < RETENTION_BATCH:
                break
        if dropped:
            log.info("retention dropped %d partitions of the task history", dropped)
        return dropped

    async def republish_lost(self) -> int:
        """Mark overdue ENQUEUED tasks of empty work queues owed again; returns how many."""
        if time.monotonic() - self._checked_at < self.check_every:
            return 0
        self._checked_at = time.monotonic()
        total = 0
        for queue in self.queues:
            ready = await self.ready_messages(queue)
            if ready != 0:
                continue
            ids = await self.store.overdue_enqueued(queue, self.overdue_after, self.batch)
            if not ids:
                continue
            count = await self.store.republish(ids)
            total += count
            log.warning(
                "work queue %s is empty but %d tasks are overdue: publishing them again",
                self.names.queue(queue),
                count,
            )
            if self.metrics is not None:
                self.metrics.republished.labels(queue).inc(count)
        return total

    async def ready_messages(self, queue: str) -> int | None:
        """Messages ready in work queue ``queue``, or None if the broker cannot say now."""
        # The raw channel's declare: aio-pika's channel answers a repeated passive
        # declare from its cache, with a stale message count.
        try:
            if self._channel is None or self._channel.is_closed:
                await self._close_channel()
                self._channel = await self.link.connection().channel(publisher_confirms=False)
            raw = await self._channel.get_underlay_channel()
            declared = await raw.queue_declare(self.names.queue(queue), passive=True, timeout=5)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            log.warning("work queue %s does not exist: run taskq rmq-init", self.names.queue(queue))
            await self._close_channel()
            return None
        except _BROKER_ERRORS as exc:
            log.debug("cannot read the depth of %s: %s", self.names.queue(queue), exc)
            await self._close_channel()
            return None
        count: int | None = declared.message_count
        return count

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the loop started by :meth:`start`, release the lock, close the depth
        channel (also opened by duties run under a relay, without a start)."""
        await super().stop(timeout)
        await self._close_channel()

    async def _stop(self, timeout: float) -> None:
        if self._wake_timer is not None:
            self._wake_timer.cancel()
        await self._cancel_tasks()
        if self._lock is not None:
            await self._lock.release()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_BROKER_ERRORS):
                await channel.close()
