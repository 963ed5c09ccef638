"""The worker: consume envelopes, claim their tasks in batches, run handlers, record outcomes.

Per delivery (docs/workers.md, "Per delivery: claim, run, record"):

1. :mod:`taskq.worker.consumer` parses the envelope; garbage is rejected, and the
   work queue dead-letters it to ``<ns>.dlq``. Good envelopes are buffered
   per queue (the priority policy is documented there).
2. :mod:`taskq.worker.claims`: when concurrency slots are free, buffered envelopes
   are claimed in batches, **one** statement each, and acked once the claim
   commits; each decision (claimed, terminal, duplicate, early, exhausted,
   missing) is acted on there.
3. :mod:`taskq.worker.execution`: the handler runs outside any transaction (but
   for the short inline window, :mod:`taskq.worker.inline`, during which its
   claim's transaction stays open and a quick success commits with it), an
   ``async def`` in its own asyncio task, a plain ``def`` in a thread
   (:mod:`taskq.worker.threads`), under the task's timeout, while one batched heartbeat
   per worker extends every lease it holds every ``lease/3`` seconds. Whatever
   the handler does (:mod:`taskq.worker.sandbox`), its attempt ends with an outcome.
4. :mod:`taskq.worker.outcomes` records outcomes, one statement per kind per batch,
   guarded by the claim's token, and publishes retries and dead letters after
   commit.

A paused queue (``POST /queues/{q}/pause``) is not consumed: :mod:`taskq.worker.pauses`
follows the pauses and :meth:`Worker._apply_pauses` cancels the queue's consumer and
gives its prefetched envelopes back to the broker, or consumes it again on a resume.

A task whose type has no handler in this worker is claimed and fails its
attempt with a retryable error (``NoHandler``) after the type's backoff: during
a rolling deploy a worker that has the handler picks it up on a later attempt;
if none ever does, the task ends FAILED in the DLQ saying why, so nothing
circulates forever. A handler's :class:`~taskq.handlers.Retry` counts as an
attempt too.

The worker also runs the relay and the sweeper; an advisory lock each keeps one
of each active across the fleet (the API's relay may be the active relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence

import orjson

from taskq.amqp.broker import Link, Publisher
from taskq.errors import (
    ConfigError,
    HandlerError,
    InvalidRequest,
    StoreError,
    TooManySchedules,
    UnknownLimiter,
)
from taskq.fleet.relay import Outbox, Relay
from taskq.fleet.schedules import first_fire, schedule_spec
from taskq.fleet.sweeper import Sweeper
from taskq.handlers import Registry
from taskq.metrics import WorkerMetrics
from taskq.payloads import GENERATED_KEY
from taskq.service import Loop, OnStop, Service, Services
from taskq.settings import Settings
from taskq.store import Store, WorkerInfo
from taskq.worker.claims import Claimer
from taskq.worker.consumer import Acker, Buffers, Consumers, Delivery
from taskq.worker.execution import (
    ABANDON_AFTER_SECONDS,
    CANCEL_GRACE_SECONDS,
    Runner,
    heartbeat_interval,
)
from taskq.worker.inline import MAX_WINDOW_SECONDS, Inline
from taskq.worker.outcomes import Finished, Recorder
from taskq.worker.pauses import PauseFollower
from taskq.worker.progress import ProgressBuffer
from taskq.worker.threads import HandlerThreads

log = logging.getLogger("taskq.worker")

TYPES_REFRESH_SECONDS = 10.0
# Sync handlers running at once unless set: as many as the concurrency, at most
# this. Threads share the GIL with the event loop, so past a few dozen more
# threads add contention (and heartbeat delay) rather than throughput; blocking
# I/O handlers that need more ask for them with --threads.
DEFAULT_THREADS = 32


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker(Service):
    """Runs the tasks of some work queues with a registry's handlers.

    Args:
        settings: connections, namespace, lease and shutdown grace.
        registry: the handlers.
        queues: work queues to consume, highest priority first (default: all).
        concurrency: handlers running at once (default ``TASKQ_WORKER_CONCURRENCY``).
        threads: sync handlers running at once, each in a thread (default
            ``TASKQ_WORKER_THREADS``, or as many as ``concurrency``, at most
            :data:`DEFAULT_THREADS`).
        prefetch: unclaimed envelopes buffered per queue (default
            ``TASKQ_WORKER_PREFETCH``, or as many as ``concurrency``).
        worker_id: the id recorded on claims (default ``host:pid:random``).
        metrics: where to count (default: a fresh registry).
        relay: run the relay and the sweeper in this process (each active in one
            process of the fleet at a time, under its own advisory lock).
        overdue_after: the sweeper's threshold for lost envelopes, in seconds
            (default ``TASKQ_SWEEPER_OVERDUE_AFTER``).
        relay_interval: seconds between relay and sweeper passes.
        cancel_grace: seconds a handler may go on after it was told that an
            operator cancelled its task, before its attempt is stopped.
        abandon_after: seconds a cancelled async handler may take to unwind
            before the worker abandons it.
        inline_window: seconds a claim's transaction stays open while its handlers
            start, so that their quick successes commit with it (default
            ``TASKQ_WORKER_INLINE_WINDOW``; 0: off; see :mod:`taskq.worker.inline`).

    Raises:
        ConfigError: if ``queues`` names a queue not in ``TASKQ_QUEUES``.
        HandlerError: if a handler names a queue not in ``TASKQ_QUEUES``.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        threads: int | None = None,
        prefetch: int | None = None,
        worker_id: str | None = None,
        metrics: WorkerMetrics | None = None,
        relay: bool = True,
        overdue_after: float | None = None,
        relay_interval: float = 1.0,
        cancel_grace: float = CANCEL_GRACE_SECONDS,
        abandon_after: float = ABANDON_AFTER_SECONDS,
        inline_window: float | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.queues = list(queues or settings.queues)
        unknown = [q for q in self.queues if q not in settings.queues]
        if unknown or not self.queues or len(set(self.queues)) != len(self.queues):
            known = ",".join(settings.queues)
            raise ConfigError("--queues", f"list distinct queues of TASKQ_QUEUES ({known})")
        self.concurrency = concurrency or settings.worker_concurrency
        self.threads = threads or settings.worker_threads or min(self.concurrency, DEFAULT_THREADS)
        # As many as the concurrency: a claim can then take a batch as large as
        # the free slots, so batches follow the load, not a second setting.
        self.prefetch = prefetch or settings.worker_prefetch or self.concurrency
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.lease = settings.lease_seconds
        self.inline_window = (
            settings.worker_inline_window if inline_window is None else inline_window
        )
        if not 0 <= self.inline_window <= MAX_WINDOW_SECONDS:
            raise ConfigError(
                "--inline-window", f"give a duration from 0 (off) to {MAX_WINDOW_SECONDS:g}s"
            )
        self._run_relay = relay
        self._overdue_after = (
            settings.sweeper_overdue_after if overdue_after is None else overdue_after
        )
        self._relay_interval = relay_interval
        self._acker = Acker()
        self._threads = HandlerThreads(self.threads, self.metrics.abandoned.labels("thread").set)
        self.progress = ProgressBuffer()
        self._runner = Runner(
            settings,
            registry,
            self.worker_id,
            self.metrics,
            self._threads,
            record=self._record,
            release=self._release,
            progress=self.progress.report,
            cancel_grace=cancel_grace,
            abandon_after=abandon_after,
        )
        self.info = WorkerInfo(
            id=self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=tuple(self.queues),
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            heartbeat_seconds=heartbeat_interval(self.lease),
        )
        self._hurry = asyncio.Event()
        self.name = f"taskq-worker {self.worker_id}"
        self.stop_timeout = settings.worker_shutdown_grace
        self._check_handlers()
        # The parts that need no database are built here; those that need the
        # store are built by start(), once its pool is open.
        # A short AMQP heartbeat: were this process frozen, the broker would
        # requeue its buffered envelopes for other workers within seconds.
        heartbeat = settings.amqp_heartbeat
        self._consume_link = Link(
            settings.amqp_urls, name=f"taskq-worker-consume {self.worker_id}", heartbeat=heartbeat
        )
        self._publish_link = Link(
            settings.amqp_urls, name=f"taskq-worker-publish {self.worker_id}", heartbeat=heartbeat
        )
        self._topology = settings.topology()
        self.publisher = Publisher(self._publish_link, self._topology, settings.max_delay)
        self._consumers = Consumers(
            self._topology.names,
            self.queues,
            self.prefetch,
            on_delivery=self._on_delivery,
            on_invalid=self._on_invalid,
            acker=self._acker,
            link=self._consume_link,
        )
        # Started in order, stopped in reverse (see taskq.service).
        self._parts = Services(name=f"taskq-worker {self.worker_id}")
        self._paused: set[str] = set()
        for queue in self.queues:
            self.metrics.queue_paused.labels(queue).set(0)

    def _check_handlers(self) -> None:
        for handler in self.registry:
            if handler.queue is not None and handler.queue not in self.settings.queues:
                raise HandlerError(
                    f"handler {handler.name!r} names queue {handler.queue!r},"
                    f" which is not in TASKQ_QUEUES ({','.join(self.settings.queues)})"
                )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, register the handlers' task types and start consuming.

        Waits for the broker if it is not up yet. A failed or interrupted start
        stops exactly what it started, in reverse order. Starting a running
        worker does nothing; a stopped worker cannot start again.

        Raises:
            StoreError: if the database cannot be reached.
            BrokerError: if a work queue does not exist.
        """
        await super().start()

    async def _start(self) -> None:
        settings, parts = self.settings, self._parts
        await parts.start()
        # The worker's statements leave no session state (the relay's lock has
        # its own connection), so the pool skips the reset round trip.
        self.store = await Store.connect(
            settings.database_url,
            min_size=2,
            max_size=10,
            session_reset=False,
            statement_cache=settings.statement_cache,
            schema=settings.db_schema,
        )
        await parts.add(OnStop(self.store.close, name="taskq-worker-store"))
        await self._register_types()
        # In the worker list from now on (the heartbeat keeps it fresh),
        # and out of it at a clean stop.
        await self.store.heartbeat([], self.info, self.lease)
        await parts.add(OnStop(self._leave_worker_list, name="taskq-worker-list"))
        # Progress reports: written every interval, and what is left at the stop.
        flush = functools.partial(self.progress.flush, self.store)
        await parts.add(OnStop(flush, name="taskq-progress-last"))
        every = functools.partial(
            self.progress.flush_every, self.store, settings.progress_interval or 0.05
        )
        await parts.add(Loop(every, name="taskq-progress"))
        for link in (self._consume_link, self._publish_link):
            await parts.add(link)
            try:
                await asyncio.wait_for(link.ready.wait(), 2.0)
            except TimeoutError:
                log.info("waiting for the broker (%s)", link.name)
                await link.ready.wait()
        await parts.add(OnStop(self.publisher.close, name="taskq-worker-publisher"))
        self._outbox = Outbox(self.store, self.publisher, in_flight=64)
        await parts.add(self._outbox)
        self._recorder = Recorder(self.store, self._outbox, self.metrics, self._runner.closed)
        await parts.add(self._recorder)
        self._claimer = Claimer(
            self.store,
            self.publisher,
            Buffers(self.queues),
            self._acker,
            begin=self._runner.begin,
            metrics=self.metrics,
            worker_id=self.worker_id,
            lease=self.lease,
            concurrency=self.concurrency,
            inline=(
                Inline(self.inline_window, self._runner, self._recorder, self.metrics)
                if self.inline_window
                else None
            ),
        )
        self._recorder.handoffs = self._claimer
        self._runner.keep_places = True
        self._runner.parents = self.store.parent_results
        await parts.add(self._claimer)
        heartbeat = functools.partial(self._runner.heartbeat_loop, self.store, self.info)
        await parts.add(Loop(heartbeat, name="taskq-heartbeat"))
        await parts.add(Loop(self._types_loop, name="taskq-types"))
        # A queue paused now is not consumed from the start.
        await self._apply_pauses(frozenset(p.queue for p in await self.store.queue_pauses()))
        await parts.add(self._consumers)
        self.pause_follower = PauseFollower(
            self.store,
            settings.session_database_url,
            apply=self._apply_pauses,
            check_every=self.info.heartbeat_seconds,
        )
        await parts.add(self.pause_follower)
        if self._run_relay:
            await parts.add(
                Relay(
                    self.store,
                    settings.session_database_url,
                    self.publisher,
                    interval=self._relay_interval,
                    set_aside=self.metrics.set_aside,
                )
            )
            await parts.add(
                Sweeper(
                    self.store,
                    self.publisher,
                    self._publish_link,
                    self._topology.names,
                    settings.queues,
                    overdue_after=self._overdue_after,
                    check_every=settings.sweeper_check_every,
                    repair_every=settings.sweeper_check_every,
                    retention=settings.retention,
                    history_partition=settings.history_partition,
                    metrics=self.metrics,
                    database_url=settings.session_database_url,
                    interval=self._relay_interval,
                )
            )
        log.info(
            "worker %s started: queues %s, concurrency %d, threads %d, prefetch %d,"
            " inline window %gms, %d handlers",
            self.worker_id,
            ",".join(self.queues),
            self.concurrency,
            self.threads,
            self.prefetch,
            self.inline_window * 1000,
            len(self.registry),
        )

    @property
    def paused_queues(self) -> frozenset[str]:
        """The queues of this worker that it does not consume because they are paused."""
        return frozenset(self._paused)

    async def _apply_pauses(self, paused: frozenset[str]) -> None:
        """Stop consuming the queues newly in ``paused``, consume those no longer in it."""
        for queue in self.queues:
            if queue in paused and queue not in self._paused:
                # The claimer first, without an await in between: from here on nothing of
                # the queue is claimed that was not in a claim already.
                given = self._claimer.pause(queue)
                await self._consumers.pause(queue)
                self.metrics.queue_paused.labels(queue).set(1)
                self.metrics.paused_given_back.labels(queue).inc(given)
                self._paused.add(queue)
                log.info(
                    "queue %s is paused: not consuming it; %d prefetched envelopes given back",
                    queue,
                    given,
                )
            elif queue not in paused and queue in self._paused:
                self._paused.discard(queue)
                self._claimer.resume(queue)
                self._consumers.resume(queue)
                self.metrics.queue_paused.labels(queue).set(0)
                log.info("queue %s is resumed: consuming it again", queue)

    async def _leave_worker_list(self) -> None:
        with contextlib.suppress(StoreError):
            await self.store.worker_gone(self.worker_id)

    async def _register_types(self) -> None:
        rows = []
        for handler in self.registry:
            strategy = None if handler.backoff is None else handler.backoff.to_json()
            rows.append(
                (
                    handler.name,
                    handler.queue or self.settings.default_queue,
                    handler.max_attempts,
                    handler.timeout,
                    None if strategy is None else orjson.dumps(strategy).decode(),
                    handler.payload_schema_json,
                    None
                    if handler.unique is None
                    else orjson.dumps(handler.unique.to_json()).decode(),
                    handler.concurrency,
                )
            )
        if rows:
            await self.store.register_task_types(rows, self.settings.max_task_types)
            limits = [(handler.name, handler.rate_limit) for handler in self.registry]
            try:
                await self.store.set_type_rate_limits(limits, "code")
            except UnknownLimiter as exc:
                raise HandlerError(str(exc)) from None
        types = await self.store.task_types()
        self._runner.load_backoffs(types)
        await self._declare_schedules()
        for record in types:
            mine = self.registry.get(record.name)
            if mine is None or mine.payload_schema_json is None or not record.payload_schema:
                continue
            if GENERATED_KEY not in orjson.loads(record.payload_schema):
                log.warning(
                    "task type %s keeps the payload_schema an operator set; its handler's"
                    " payload model is not registered (PUT the type without one to let"
                    " workers register it)",
                    record.name,
                )

    async def _declare_schedules(self) -> None:
        """Put the schedules that the handlers declare (``schedule=``) into
        ``schedules``, keeping the next fire of each whose timing is unchanged, and
        delete the code's schedules of these types that the code no longer declares.

        Raises:
            HandlerError: a declared schedule is invalid, or there are too many.
        """
        declared: list[str] = []
        now = await self.store.database_now()
        for handler in self.registry:
            if handler.schedule is None:
                continue
            name, body = handler.schedule.definition(handler.name)
            try:
                spec, table = schedule_spec(name, body, source="code")
                await self.store.put_schedule(
                    spec, first_fire(table, now), max_schedules=self.settings.max_schedules
                )
            except (InvalidRequest, TooManySchedules) as exc:
                raise HandlerError(f"{handler.name}: its schedule {name!r}: {exc}") from None
            declared.append(name)
        gone = await self.store.delete_code_schedules([h.name for h in self.registry], declared)
        if declared or gone:
            log.info(
                "schedules declared: %s%s",
                ", ".join(declared) or "none",
                f"; no longer declared, deleted: {', '.join(gone)}" if gone else "",
            )

    async def _types_loop(self) -> None:
        # Admins may edit a type's backoff; take it up within a few seconds.
        while True:
            await asyncio.sleep(TYPES_REFRESH_SECONDS)
            with contextlib.suppress(StoreError):
                self._runner.load_backoffs(await self.store.task_types())

    def _record(self, outcome: Finished) -> None:
        self._recorder.add(outcome)

    def hurry(self) -> None:
        """End the shutdown grace now (a second Ctrl-C)."""
        self._hurry.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully.

        Stops consuming, lets running handlers finish within ``timeout`` seconds
        (the grace, default ``TASKQ_WORKER_SHUTDOWN_GRACE``), gives back the
        tasks still running after that (ENQUEUED again, the attempt not
        counted), records every outcome and closes. Buffered unclaimed
        envelopes go back to their queues when the channels close. Stopping
        again, or before starting, does nothing.

        Handlers still running after the grace are cancelled (async) and
        abandoned after ``abandon_after`` seconds if they go on, so a stop takes
        at most about ``timeout + abandon_after`` plus the time to record the
        outcomes; :meth:`runaways` then says how many still run.
        """
        await super().stop(timeout)

    async def _stop(self, timeout: float) -> None:
        if self._consumers.running:  # else a start that failed: close what it opened
            log.info(
                "worker %s stopping: %d tasks running", self.worker_id, len(self._runner.attempts)
            )
            await self._consumers.stop_receiving()
            await self._claimer.stop()  # the claims in flight, and the deliveries settled
            await self._wait_for_handlers(self._runner.running(), timeout)
            await asyncio.gather(*self._runner.interrupt(), return_exceptions=True)
            await self._recorder.stop()
        await self._parts.stop()
        self._threads.close()
        if self._runner.runaways:
            log.warning(
                "%d abandoned async handlers are still running (they ignore cancellation)",
                len(self._runner.runaways),
            )
        log.info("worker %s stopped", self.worker_id)

    def runaways(self) -> int:
        """Abandoned handlers still running: async ones ignoring their cancellation, and
        sync ones' threads. A process should exit without waiting for them."""
        return len(self._runner.runaways) + self._threads.abandoned

    async def _wait_for_handlers(self, running: list[asyncio.Task[None]], grace: float) -> None:
        """Wait until the handlers finish, ``grace`` passes or :meth:`hurry` is called."""
        deadline = time.monotonic() + grace
        hurry = asyncio.create_task(self._hurry.wait())
        pending = [task for task in running if not task.done()]
        while pending and not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.wait([*pending, hurry], timeout=remaining, return_when="FIRST_COMPLETED")
            pending = [task for task in pending if not task.done()]
        hurry.cancel()

    async def run(
        self, stop: asyncio.Event, on_started: Callable[[], object] | None = None
    ) -> None:
        """Start, call ``on_started``, run until ``stop`` is set, then stop gracefully.

        A stop while starting (e.g. waiting for the broker) closes what was opened.
        """
        starting = asyncio.create_task(self.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopped], return_when="FIRST_COMPLETED")
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        stopped.cancel()
        starting.result()
        if on_started is not None:
            on_started()
        await stop.wait()
        await self.stop()

    # ------------------------------------------------------------------ deliveries

    def _release(self) -> None:
        self._claimer.release()

    def _on_delivery(self, delivery: Delivery) -> None:
        self._claimer.put(delivery)

    def _on_invalid(self, queue: str, error: Exception) -> None:
        log.warning("rejected an invalid envelope from %s to the DLQ: %s", queue, error)
        self.metrics.deliveries.labels(queue, "invalid").inc()
        self.metrics.dead_lettered.labels(queue, "invalid").inc()
