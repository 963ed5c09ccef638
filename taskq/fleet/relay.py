"""Owed publishes: the outbox publishes after a commit, the relay whatever is still owed.

A publish is owed while ``tasks.published_at`` is NULL on an ENQUEUED row (to
the work or delay queues) or a FAILED row (to the dead-letter queue). The
normal paths publish right after their commit; the relay catches whatever they
could not (the process died, the broker was down, a confirm was lost), and
publishes at once the tasks a caller enqueued inside its own transaction
(woken by the NOTIFY that transaction sends on commit).

A failing broker and a failing row are told apart (:func:`publish_owed`): when
the broker fails (unreachable, a timeout) the pass stops and the rows stay owed
for the next one; a row that fails alone (its queue is no longer in the
topology or its publish comes back unroutable, its delay exceeds the delay
levels, the broker refuses it while it confirms the others) is *set aside*
with the reason (the task's ``publish_error``) and retried now and then
(:data:`SET_ASIDE_RETRY_MIN` to :data:`SET_ASIDE_RETRY_MAX` seconds apart, a
few per pass), so newer rows keep flowing and a queue added back recovers its
tasks.

One relay is active across the fleet: the one holding a Postgres advisory lock
on a dedicated connection (:mod:`taskq.fleet.leader`). The others wait and take over
if it dies or freezes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from taskq.amqp.broker import Publish, Publisher
from taskq.amqp.envelope import Envelope
from taskq.errors import DelayTooLong, Nacked, TaskqError, Unpublishable
from taskq.fleet.leader import SessionLock, lead, lock_key
from taskq.fleet.marker import Marker
from taskq.model import OwedPublish, TaskStatus
from taskq.service import Service, raise_if_cancelled
from taskq.store import Store
from taskq.tracing import TRACEPARENT, header

log = logging.getLogger("taskq.relay")

# pg_advisory_lock key of the active relay: "relay" in ASCII.
LOCK_KEY = 0x72656C6179

# How old an owed row must be before the relay publishes it: younger ones are
# the outboxes' to publish. An outbox leaves to the relay any row that waited
# longer than OUTBOX_MAX_WAIT, so the two never publish the same row.
RELAY_MIN_AGE = 5.0
OUTBOX_MAX_WAIT = RELAY_MIN_AGE / 2
# Rows an outbox publishes in one write; in_flight / OUTBOX_BATCH batches go at once.
OUTBOX_BATCH = 32
# At most one log line per this many seconds about rows left to the relay.
HANDOVER_LOG_SECONDS = 10.0
# A set-aside row is retried after as long as its publish has been owed, within
# these bounds, and at most SET_ASIDE_RETRY_BATCH of them per pass.
SET_ASIDE_RETRY_MIN = 30.0
SET_ASIDE_RETRY_MAX = 600.0
SET_ASIDE_RETRY_BATCH = 50
# Batches of owed rows one pass publishes at most (the rest waits for the next).
BATCHES_PER_PASS = 20

_ENQUEUED = TaskStatus.ENQUEUED

HEADER_REASON = "x-taskq-reason"
HEADER_ATTEMPTS = "x-taskq-attempts"
HEADER_ORIGIN = "x-taskq-origin-queue"


def dead_letter_headers(reason: str, attempts: int, queue: str) -> dict[str, Any]:
    """The headers that say why an envelope is in the DLQ."""
    return {HEADER_REASON: reason[:1000], HEADER_ATTEMPTS: attempts, HEADER_ORIGIN: queue}


def _publish(owed: OwedPublish, delay: float | None) -> Publish:
    """What ``owed`` says: ENQUEUED to its queue (after ``delay``, default its own), FAILED
    to the DLQ; with the enqueuer's ``traceparent`` header if it was traced."""
    envelope = Envelope(owed.id, owed.type, owed.attempts)
    if owed.status == TaskStatus.FAILED:
        reason = owed.last_error or "failed"
        headers = dead_letter_headers(reason, owed.attempts, owed.queue)
        if owed.traceparent is not None:
            headers[TRACEPARENT] = owed.traceparent
        return Publish(envelope, owed.queue, headers=headers, dead_letter=True)
    return Publish(
        envelope, owed.queue, owed.delay if delay is None else delay, header(owed.traceparent)
    )


async def publish_rows(
    publisher: Publisher,
    rows: Sequence[OwedPublish],
    delays: Sequence[float | None] | None = None,
) -> list[TaskqError | None]:
    """Pay owed publishes in one batch; for each, None if confirmed, else why not."""
    chosen = delays if delays is not None else [None] * len(rows)
    items = [_publish(owed, delay) for owed, delay in zip(rows, chosen, strict=True)]
    return await publisher.publish_many(items)


async def publish_row(publisher: Publisher, owed: OwedPublish) -> bool:
    """Pay one owed publish; whether it was confirmed (a failure is logged)."""
    (error,) = await publish_rows(publisher, [owed])
    if error is not None:
        log.warning("publish of task %s failed, still owed: %s", owed.id, error)
    return error is None


@dataclass(frozen=True, slots=True)
class Paid:
    """What :func:`publish_owed` did with a batch of owed rows."""

    confirmed: int = 0
    set_aside: int = 0
    broker_failed: bool = False  # some rows failed for the broker's sake: they stay owed


def _fault_of_row(error: TaskqError, others_confirmed: bool) -> str | None:
    """Why a failed publish is the row's own fault (a metric label), or None if the
    broker's: a nack counts as the row's only while the broker confirms others."""
    if isinstance(error, Unpublishable):
        return "unroutable"
    if isinstance(error, DelayTooLong):
        return "delay_too_long"
    if isinstance(error, Nacked) and others_confirmed:
        return "nacked"
    return None


def _reason(error: TaskqError) -> str:
    """An error as a bounded text column (no NUL)."""
    return f"{type(error).__name__}: {error}".replace("\x00", "\\0")[:1000]


async def publish_owed(
    store: Store,
    publisher: Publisher,
    rows: Sequence[OwedPublish],
    *,
    set_aside: Counter | None = None,
) -> Paid:
    """Publish owed rows in one batch, mark the confirmed ones and set aside, with their
    reason, those that failed for the row alone (counted in ``set_aside`` by queue and
    reason). The rest of the failures are the broker's: those rows stay owed."""
    if not rows:
        return Paid()
    errors = await publish_rows(publisher, rows)
    confirmed = [(row.id, row.generation) for row, e in zip(rows, errors, strict=True) if e is None]
    await store.mark_published(confirmed)
    faults: list[tuple[OwedPublish, TaskqError, str]] = []
    broker: list[tuple[OwedPublish, TaskqError]] = []
    for row, error in zip(rows, errors, strict=True):
        if error is not None:
            kind = _fault_of_row(error, bool(confirmed))
            if kind is None:
                broker.append((row, error))
            else:
                faults.append((row, error, kind))
    if broker:
        row, error = broker[0]
        log.warning("%d owed publishes failed, still owed: %s", len(broker), error)
    aside = 0
    if faults:
        kinds = {row.id: kind for row, _, kind in faults}
        items = [(row.id, row.generation, _reason(error)) for row, error, _ in faults]
        done = await store.set_aside(items, SET_ASIDE_RETRY_MIN, SET_ASIDE_RETRY_MAX)
        aside = len(done)
        fresh = [entry for entry in done if entry.newly]
        if set_aside is not None:
            for entry in fresh:
                set_aside.labels(entry.queue, kinds[entry.id]).inc()
        row, error, _ = faults[0]
        log.warning(
            "set %d owed publishes aside (%d again), retried in %g s to %g s:"
            " they fail for the row alone, e.g. task %s: %s",
            aside,
            aside - len(fresh),
            SET_ASIDE_RETRY_MIN,
            SET_ASIDE_RETRY_MAX,
            row.id,
            error,
        )
    return Paid(len(confirmed), aside, bool(broker))


class Outbox(Service):
    """Publishes rows right after their commit, in the background, many confirms in flight.

    Callers hand over committed rows and go on: the task is durable already. A
    row the outbox cannot publish (broker down, queue full, process stopping)
    stays owed in Postgres, and the relay publishes it later.

    A row that waited in the outbox longer than ``max_wait`` (enqueues outpace
    the broker) is not published here but handed to the relay, woken by a
    NOTIFY to publish it at once: the relay takes unannounced rows only once
    they are :data:`RELAY_MIN_AGE` old, so were the outbox to publish such a row
    late, the relay could publish it too, and the broker and the workers would
    carry every one of those tasks twice.

    Args:
        store: where confirmed publishes are recorded (in batches, by a :class:`Marker`).
        publisher: the confirming publisher.
        in_flight: how many publishes await their confirm at once.
        batch: rows one write publishes at most; ``in_flight // batch`` batches go at
            once. A batch takes whatever is queued when it starts, so under load the
            batches grow (fewer writes, and fewer wake-ups of the broker, per row),
            and a row that comes while nothing is in flight goes at once.
        capacity: rows waiting beyond that; more are left to the relay.
        max_wait: seconds a row may wait for its publish to start; older ones
            are left to the relay. Keep it well below the relay's minimum age.
        on_failure: called once per publish that failed.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        in_flight: int = 256,
        batch: int = OUTBOX_BATCH,
        capacity: int = 50_000,
        max_wait: float = OUTBOX_MAX_WAIT,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._publisher = publisher
        self._queue: asyncio.Queue[tuple[OwedPublish, float]] = asyncio.Queue(capacity)
        self._marker = Marker(store)
        self._on_failure = on_failure
        self._in_flight = in_flight
        self._batch = batch
        self._max_wait = max_wait
        self.handed_over = 0  # rows left to the relay because they waited too long
        self._logged_at = -HANDOVER_LOG_SECONDS
        self._logged_count = 0

    name = "taskq-outbox"

    async def _start(self) -> None:
        await self._marker.start()
        for n in range(max(1, self._in_flight // self._batch)):
            self._spawn(self._run(), f"taskq-outbox-{n}")

    def submit(self, owed: OwedPublish) -> bool:
        """Queue ``owed`` for publishing; False if full (the relay will publish it)."""
        try:
            self._queue.put_nowait((owed, time.monotonic()))
        except asyncio.QueueFull:
            return False
        return True

    async def _run(self) -> None:
        """Take what is queued (up to a batch) and publish it, until cancelled (a
        cancellation a publish swallowed included: see raise_if_cancelled)."""
        while True:
            raise_if_cancelled()
            batch = [await self._queue.get()]
            while len(batch) < self._batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._publish(batch)
            except Exception:
                # Whatever it was, this runner goes on with the next batch; these
                # rows stay owed in Postgres and the relay publishes them.
                log.exception("outbox: %d rows not published, left to the relay", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _publish(self, batch: list[tuple[OwedPublish, float]]) -> None:
        """Publish a batch in one write and mark the confirmed rows; hand late ones over."""
        now = time.monotonic()
        rows, delays = [], []
        for row, submitted in batch:
            waited = now - submitted
            if waited > self._max_wait:
                self._hand_over(row.id)
                continue
            rows.append(row)
            delays.append(max(0.0, row.delay - waited) if row.status == _ENQUEUED else 0.0)
        errors = await publish_rows(self._publisher, rows, delays) if rows else []
        failed = 0
        for row, error in zip(rows, errors, strict=True):
            if error is None:
                self._marker.add(row.id, row.generation)
                continue
            failed += 1
            if self._on_failure is not None:
                self._on_failure()
        if failed:
            first = next(error for error in errors if error is not None)
            log.warning("%d publishes failed, left to the relay: %s", failed, first)

    def _hand_over(self, task_id: uuid.UUID) -> None:
        """Leave a row owed for the relay and wake it; say so now and then."""
        self._marker.hand_over(task_id)
        self.handed_over += 1
        now = time.monotonic()
        if now - self._logged_at >= HANDOVER_LOG_SECONDS:
            log.info(
                "the broker falls behind: %d envelopes waited over %gs and are left to the relay",
                self.handed_over - self._logged_count,
                self._max_wait,
            )
            self._logged_at, self._logged_count = now, self.handed_over

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the queued rows to be published."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def _stop(self, timeout: float) -> None:
        """Publish what is queued (within ``timeout``), then stop; the rest stays owed."""
        await self.drain(timeout)
        await self._cancel_tasks()
        await self._marker.stop()


class Relay(Service):
    """Publishes owed rows while this process holds the relay lock.

    Args:
        store: the database.
        database_url: for the dedicated connection that holds the lock and LISTENs.
        publisher: where to publish.
        interval: seconds between passes over the owed rows.
        min_age: the relay's minimum age: how old an owed row must be before it takes it, so that it
            does not race the publish that normally follows a commit.
        duties: further coroutines run on every pass while the lock is held
            (the worker's sweeper adds its lease recovery here).
        set_aside: counts the rows set aside, by queue and reason.
    """

    def __init__(
        self,
        store: Store,
        database_url: str,
        publisher: Publisher,
        *,
        interval: float = 1.0,
        min_age: float = RELAY_MIN_AGE,
        batch: int = 500,
        duties: Sequence[Callable[[], Awaitable[Any]]] = (),
        set_aside: Counter | None = None,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.publisher = publisher
        self.interval = interval
        self.min_age = min_age
        self.batch = batch
        self.duties = list(duties)
        self.set_aside = set_aside
        self._lock = SessionLock(database_url, lock_key(LOCK_KEY, store.schema), "relay")
        self._listening: object | None = None
        self._notified: set[uuid.UUID] = set()
        self._wake = asyncio.Event()

    name = "taskq-relay"

    async def _start(self) -> None:
        self._spawn(lead(self._lock, self._lead, interval=self.interval, wake=self._wake))

    async def _stop(self, timeout: float) -> None:
        await self._cancel_tasks()
        await self._lock.release()

    @property
    def active(self) -> bool:
        """Whether this process is the active relay."""
        return self._lock.held

    async def _lead(self) -> None:
        connection = self._lock.connection
        if self._listening is not connection and connection is not None:
            await connection.add_listener(self.store.notify_channel, self._on_notify)
            self._listening = connection
        await self.pass_once(check=self._lock.ensure)

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        for text in payload.split(","):
            with contextlib.suppress(ValueError):
                self._notified.add(uuid.UUID(text))
        self._wake.set()

    async def pass_once(self, *, check: Callable[[], Awaitable[None]] | None = None) -> int:
        """Publish what is owed now; run the extra duties; retry a few rows set aside.
        Returns how many were published.

        ``check`` runs before each step (the lock's :meth:`~SessionLock.ensure`) and
        raises if this process may no longer act as the relay.
        """
        ensure = check or _leading
        published = 0
        while self._notified:
            await ensure()
            ids = list(itertools.islice(self._notified, self.batch))
            self._notified.difference_update(ids)
            rows = await self.store.owed_among(ids)
            published += (await self._pay(rows)).confirmed
        for duty in self.duties:
            await ensure()
            await duty()
        for _ in range(BATCHES_PER_PASS):
            await ensure()
            rows = await self.store.publish_owed(self.min_age, self.batch)
            paid = await self._pay(rows)
            published += paid.confirmed
            if paid.broker_failed or paid.confirmed + paid.set_aside == 0:
                break  # the broker is failing (try again next pass), or nothing is left
        await ensure()
        rows = await self.store.set_aside_due(SET_ASIDE_RETRY_BATCH)
        recovered = (await self._pay(rows)).confirmed
        if recovered:
            log.info("relay published %d owed envelopes it had set aside", recovered)
        published += recovered
        if published:
            log.info("relay published %d owed envelopes", published)
        return published

    async def _pay(self, rows: Sequence[OwedPublish]) -> Paid:
        return await publish_owed(self.store, self.publisher, rows, set_aside=self.set_aside)


async def _leading() -> None:
    """The check of a pass run outside :meth:`Relay.start` (tests, one-off runs)."""
