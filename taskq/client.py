"""Enqueue tasks from Python, without HTTP. The HTTP API is a thin layer over this.

Single enqueues from many concurrent callers are grouped into one INSERT (a
short queue drained by a few flushers), and every publish keeps its confirm in
flight concurrently with the others; published markers are written in batches.
A task's row, events and publish are what they would be one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from jsonschema import Draft202012Validator
from referencing.exceptions import Unresolvable

from taskq import validation
from taskq.broker import Link, Publisher
from taskq.errors import IdempotencyConflict, RejectedByDatabase
from taskq.metrics import ApiMetrics
from taskq.relay import Outbox
from taskq.settings import Settings
from taskq.store import Enqueued, NewTask, Store
from taskq.validation import FieldError, InvalidRequest

TYPES_TTL = 2.0
MAX_INSERT_BATCH = 500
FLUSHERS = 4


@dataclass(frozen=True)
class TaskType:
    """A registry entry as the enqueue path needs it."""

    name: str
    queue: str
    max_attempts: int
    timeout: float
    backoff: dict[str, Any] | None
    payload_schema: dict[str, Any] | None
    enabled: bool
    validator: Draft202012Validator | None

    @classmethod
    def from_row(cls, row: Any) -> TaskType:
        schema = orjson.loads(row["payload_schema"]) if row["payload_schema"] else None
        return cls(
            name=row["name"],
            queue=row["queue"],
            max_attempts=row["max_attempts"],
            timeout=row["timeout_seconds"],
            backoff=orjson.loads(row["backoff"]) if row["backoff"] else None,
            payload_schema=schema,
            enabled=row["enabled"],
            validator=Draft202012Validator(schema) if schema else None,
        )


class TypeCache:
    """The task type registry, re-read when older than ``ttl`` seconds or on a miss.

    A type disabled or edited elsewhere takes effect here within ``ttl``; the
    insert itself joins the live registry, so a stale cache never admits a task
    whose type is gone.
    """

    def __init__(self, store: Store, ttl: float = TYPES_TTL) -> None:
        self._store = store
        self._ttl = ttl
        self._types: dict[str, TaskType] = {}
        self._loaded_at = -1e9
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> TaskType | None:
        stale = time.monotonic() - self._loaded_at > self._ttl
        if stale or (name not in self._types and time.monotonic() - self._loaded_at > 0.05):
            await self.refresh()
        return self._types.get(name)

    async def refresh(self) -> None:
        async with self._lock:
            rows = await self._store.task_types()
            self._types = {row["name"]: TaskType.from_row(row) for row in rows}
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        self._loaded_at = -1e9


@dataclass(frozen=True)
class EnqueueResult:
    """The answer to one enqueue: ``created`` is False for an idempotent replay."""

    created: bool
    task: dict[str, Any]

    @property
    def id(self) -> Any:
        return self.task["id"]


class _InsertBatcher:
    """Groups concurrent single enqueues into one INSERT statement."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: asyncio.Queue[tuple[NewTask, asyncio.Future[Enqueued]]] = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._flush(), name=f"taskq-insert-{n}") for n in range(FLUSHERS)
        ]

    async def submit(self, task: NewTask) -> Enqueued:
        future: asyncio.Future[Enqueued] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((task, future))
        return await future

    async def _flush(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_INSERT_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._store.enqueue([task for task, _ in batch])
            except RejectedByDatabase as exc:
                if len(batch) == 1:
                    self._fail(batch, exc)
                    continue
                # One row the database refuses must not fail the requests that
                # shared its statement: insert them one by one.
                for item in batch:
                    try:
                        self._settle([item], await self._store.enqueue([item[0]]))
                    except Exception as exc:
                        self._fail([item], exc)
                continue
            except Exception as exc:  # every waiter gets the error, the flusher goes on
                self._fail(batch, exc)
                continue
            self._settle(batch, results)

    @staticmethod
    def _settle(
        batch: list[tuple[NewTask, asyncio.Future[Enqueued]]], results: list[Enqueued]
    ) -> None:
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[NewTask, asyncio.Future[Enqueued]]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Client:
    """Enqueue tasks into taskq from Python.

    Args:
        settings: connections, namespace and limits.
        store: the database; the client owns it if it opened it.
        publisher: the confirming publisher.
        metrics: counters to update (the API passes its own).

    Use :meth:`connect` to open everything from settings.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        *,
        metrics: ApiMetrics | None = None,
        link: Link | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.metrics = metrics or ApiMetrics()
        self.types = TypeCache(store)
        self._link = link
        self.outbox = Outbox(store, publisher, on_failure=self.metrics.publish_failures.inc)
        self.outbox.start()
        self._batcher = _InsertBatcher(store)

    @classmethod
    async def connect(cls, settings: Settings, *, metrics: ApiMetrics | None = None) -> Client:
        """Open a database pool and a broker link (which may come up later)."""
        store = await Store.connect(settings.database_url)
        link = Link(settings.amqp_url, name="taskq-client", heartbeat=settings.amqp_heartbeat)
        await link.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.ready.wait(), 5.0)
        publisher = Publisher(link, settings.topology(), settings.max_delay)
        return cls(settings, store, publisher, metrics=metrics, link=link)

    async def close(self) -> None:
        await self._batcher.close()
        await self.outbox.close()
        await self.publisher.close()
        if self._link is not None:
            await self._link.close()
        await self.store.close()

    async def enqueue(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        timeout: float | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> EnqueueResult:
        """Enqueue one task.

        With ``connection``, the task is inserted in that connection's open
        transaction: it exists, and is published (by the relay, woken at
        commit), only if that transaction commits.

        Raises:
            InvalidRequest: naming the fields at fault.
            IdempotencyConflict: the key was used with another request.
            StoreError: the database is unreachable.
        """
        data: dict[str, Any] = {"type": type, "payload": payload}
        for name, value in (
            ("queue", queue),
            ("max_attempts", max_attempts),
            ("idempotency_key", idempotency_key),
            ("delay", delay),
            ("timeout", timeout),
        ):
            if value is not None:
                data[name] = value
        if run_at is not None:
            data["run_at"] = run_at.isoformat() if isinstance(run_at, datetime) else run_at
        if connection is not None:
            return (await self.enqueue_many([data], connection=connection))[0]
        return await self.submit(data)

    async def submit(self, data: Any) -> EnqueueResult:
        """Enqueue one task from a request body (a parsed JSON object)."""
        started = time.perf_counter()
        try:
            task, body = validation.enqueue_task(data, self.settings)
            await self._check_type(body.type, body.payload, body.queue, "")
            result = await self._batcher.submit(task)
            answer = self._settle(task, result, "")
        except (InvalidRequest, IdempotencyConflict) as exc:
            outcome = "conflict" if isinstance(exc, IdempotencyConflict) else "invalid"
            self.metrics.enqueue_total.labels("", "", outcome).inc()
            raise
        queue = answer.task["queue"]
        self.metrics.enqueue_total.labels(body.type, queue, _outcome(answer)).inc()
        self.metrics.enqueue_latency.labels(body.type, queue).observe(time.perf_counter() - started)
        return answer

    async def enqueue_many(
        self, items: Sequence[Any], *, connection: asyncpg.Connection | None = None
    ) -> list[EnqueueResult]:
        """Enqueue up to 1000 tasks all-or-nothing in one transaction.

        Raises:
            InvalidRequest: naming the index and field of every error; nothing is created.
            IdempotencyConflict: a key was used with another request; nothing is created.
        """
        errors: list[InvalidRequest] = []
        tasks: list[NewTask] = []
        for index, item in enumerate(validation.batch_items({"tasks": list(items)})):
            prefix = f"tasks[{index}]"
            try:
                task, body = validation.enqueue_task(item, self.settings, prefix=prefix)
                await self._check_type(body.type, body.payload, body.queue, prefix + ".")
            except InvalidRequest as exc:
                errors.append(exc)
            else:
                tasks.append(task)
        validation.raise_all(errors)
        results = await self.store.enqueue(tasks, connection, all_or_nothing=True)
        for index, (task, result) in enumerate(zip(tasks, results, strict=True)):
            if result.outcome == "conflict":
                assert task.idempotency_key is not None and result.row is not None
                raise IdempotencyConflict(
                    task.idempotency_key, result.row["id"], f"tasks[{index}].idempotency_key"
                )
            if result.outcome == "unknown_type":
                raise InvalidRequest([FieldError(f"tasks[{index}].type", "unknown task type")])
        if connection is not None:  # published by the relay when the caller commits
            return [EnqueueResult(r.outcome == "created", r.row or {}) for r in results]
        answers = [
            self._settle(t, r, f"tasks[{i}].")
            for i, (t, r) in enumerate(zip(tasks, results, strict=True))
        ]
        # Counted once per label set, not per task (each labels() call takes a lock).
        counts = Counter((a.task["type"], a.task["queue"], _outcome(a)) for a in answers)
        for labels, count in counts.items():
            self.metrics.enqueue_total.labels(*labels).inc(count)
        return answers

    async def _check_type(
        self, name: str, payload: dict[str, Any], queue: str | None, prefix: str
    ) -> None:
        task_type = await self.types.get(name)
        if task_type is None:
            raise InvalidRequest([FieldError(prefix + "type", f"unknown task type {name!r}")])
        if not task_type.enabled:
            raise InvalidRequest([FieldError(prefix + "type", f"task type {name!r} is disabled")])
        if queue is None and task_type.queue not in self.settings.queues:
            raise InvalidRequest(
                [FieldError(prefix + "queue", f"the type's queue {task_type.queue!r} is unknown")]
            )
        if task_type.validator is not None:
            try:
                error = next(iter(task_type.validator.iter_errors(payload)), None)
            except RecursionError:  # a recursive schema walking a deep payload
                raise InvalidRequest(
                    [FieldError(prefix + "payload", "nested too deeply for the type's schema")]
                ) from None
            except Unresolvable as exc:  # the type's schema has a $ref that leads nowhere
                raise InvalidRequest(
                    [FieldError(prefix + "type", f"the type's payload_schema is broken: {exc}")]
                ) from None
            if error is not None:
                path = "".join(
                    f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
                )
                raise InvalidRequest([FieldError(f"{prefix}payload{path}", error.message)])

    def _settle(self, task: NewTask, result: Enqueued, prefix: str) -> EnqueueResult:
        """Turn the store's answer into ours; publish what was created."""
        if result.outcome == "conflict":
            assert task.idempotency_key is not None and result.row is not None
            raise IdempotencyConflict(
                task.idempotency_key, result.row["id"], prefix + "idempotency_key"
            )
        if result.outcome == "unknown_type":
            raise InvalidRequest([FieldError(prefix + "type", f"unknown task type {task.type!r}")])
        assert result.row is not None
        if result.outcome == "created":
            # The task is durable now; the outbox publishes it in the background.
            row = {
                **result.row,
                "delay": result.delay,
                "last_error": None,
                "generation": result.generation,
            }
            self.outbox.submit(row)
        return EnqueueResult(result.outcome == "created", result.row)


def _outcome(answer: EnqueueResult) -> str:
    return "created" if answer.created else "replayed"
