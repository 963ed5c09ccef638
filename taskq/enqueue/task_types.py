"""The task type registry as the enqueue path sees it: a cache, and payload checks.

The cache is one snapshot of the ``task_type`` table. A read refreshes it when it
is older than ``ttl`` (in the background while the snapshot is younger than
``ttl * STALE_FACTOR`` and holds the name, answering from it meanwhile), or when
the name is missing from a snapshot older than ``MISS_REFRESH_AFTER`` and was not
found missing within ``NEGATIVE_TTL``.
Refreshes are single-flight: concurrent callers share one query, so a flood of
unknown names costs at most one query at a time (and at most one per
``MISS_REFRESH_AFTER``). The insert itself joins the live registry, so a stale
cache never admits a task whose type is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from referencing.exceptions import Unresolvable

from taskq.enqueue import schemas
from taskq.errors import FieldError, InvalidRequest, SchemaProblem
from taskq.model import TaskTypeRecord
from taskq.store import Store
from taskq.unique import Unique
from taskq.unique import parse as parse_unique

TYPES_TTL = 2.0
# A snapshot younger than TYPES_TTL * STALE_FACTOR answers for the names it holds while
# a newer one is read; an older one (the database was away) is waited for.
STALE_FACTOR = 5
MISS_REFRESH_AFTER = 0.05
NEGATIVE_TTL = 1.0
MAX_MISSES = 10_000
# Deadline of one payload check (taskq.enqueue.offload), plus this much per payload of a batch.
CHECK_SECONDS = 1.0
CHECK_SECONDS_PER_PAYLOAD = 0.002


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
    updated_at: Any
    validator: Any | None
    # Why the stored schema cannot be used (it predates taskq's checks), or None.
    broken: str | None = None
    # Its tasks' uniqueness when their enqueue gives none (taskq.unique), and why the
    # stored one cannot be used (written to the table by hand), or None.
    unique: Unique | None = None
    unique_broken: str | None = None

    @classmethod
    def from_record(cls, record: TaskTypeRecord) -> TaskType:
        schema = orjson.loads(record.payload_schema) if record.payload_schema else None
        broken = None
        if schema is not None:
            try:
                schemas.check_runnable(schema)
            except SchemaProblem as exc:
                broken = str(exc)
        unique, unique_broken = None, None
        if record.unique_spec:
            try:
                unique = parse_unique(orjson.loads(record.unique_spec))
            except InvalidRequest as exc:
                unique_broken = str(exc)
        return cls(
            name=record.name,
            queue=record.queue,
            max_attempts=record.max_attempts,
            timeout=record.timeout_seconds,
            backoff=orjson.loads(record.backoff) if record.backoff else None,
            payload_schema=schema,
            enabled=record.enabled,
            updated_at=record.updated_at,
            validator=schemas.PayloadValidator(schema) if schema and not broken else None,
            broken=broken,
            unique=unique,
            unique_broken=unique_broken,
        )


class TypeCache:
    """The task type registry, re-read when older than ``ttl`` seconds or on a miss."""

    def __init__(self, store: Store, ttl: float = TYPES_TTL) -> None:
        self._store = store
        self._ttl = ttl
        self._types: dict[str, TaskType] = {}
        self._loaded_at = -1e9
        self._generation = 0  # moved on by invalidate(): older reads are stale
        self._refreshing: tuple[int, asyncio.Task[None]] | None = None
        self._misses: dict[str, float] = {}

    async def get(self, name: str) -> TaskType | None:
        now = time.monotonic()
        age = now - self._loaded_at
        if age > self._ttl and name in self._types and age < self._ttl * STALE_FACTOR:
            # Answer from the snapshot and refresh it in the background: the query
            # stays off the requests' way (it held up every request arriving during
            # it, every ttl seconds). The insert joins the live registry anyway.
            self._refresh_soon()
        elif age > self._ttl:
            await self.refresh()
        elif name not in self._types and age > MISS_REFRESH_AFTER:
            missed = self._misses.get(name)
            if missed is None or now - missed > NEGATIVE_TTL:
                await self.refresh()
        found = self._types.get(name)
        if found is None:
            if len(self._misses) >= MAX_MISSES:
                self._misses.clear()
            self._misses[name] = time.monotonic()
        return found

    async def refresh(self) -> None:
        """Read the registry; callers that come meanwhile share the same read."""
        await asyncio.shield(self._refresh_soon())

    def _refresh_soon(self) -> asyncio.Task[None]:
        """The read of the registry under way, started if there is none."""
        if self._refreshing is None or self._refreshing[0] != self._generation:
            task = asyncio.create_task(self._load(self._generation))
            self._refreshing = (self._generation, task)
            task.add_done_callback(self._refreshed)
        return self._refreshing[1]

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is not None and self._refreshing[1] is task:
            self._refreshing = None
        if not task.cancelled():
            task.exception()  # seen by the callers that awaited it; not logged again

    async def _load(self, generation: int) -> None:
        records = await self._store.task_types()
        known = self._types
        types = {}
        for record in records:
            old = known.get(record.name)
            # Unchanged rows keep their entry (and its compiled validator).
            same = old is not None and old.updated_at == record.updated_at
            types[record.name] = old if same and old is not None else TaskType.from_record(record)
        self._types = types
        self._misses.clear()
        if generation == self._generation:
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        """Forget the snapshot (a type was written here): the next read refreshes."""
        self._generation += 1
        self._loaded_at = -1e9
        self._misses.clear()

    def __len__(self) -> int:
        return len(self._types)


def check_type(
    task_type: TaskType | None, name: str, queue: str | None, queues: Sequence[str], prefix: str
) -> TaskType:
    """The type an enqueue names, if it may be used; raises InvalidRequest naming why not."""
    if task_type is None:
        raise InvalidRequest([FieldError(prefix + "type", f"unknown task type {name!r}")])
    if not task_type.enabled:
        raise InvalidRequest([FieldError(prefix + "type", f"task type {name!r} is disabled")])
    if queue is None and task_type.queue not in queues:
        raise InvalidRequest(
            [FieldError(prefix + "queue", f"the type's queue {task_type.queue!r} is unknown")]
        )
    if task_type.unique_broken is not None:
        message = f"the type's unique is unusable: {task_type.unique_broken}"
        raise InvalidRequest([FieldError(prefix + "type", message)])
    if task_type.broken is not None:
        raise InvalidRequest(
            [
                FieldError(
                    prefix + "type", f"the type's payload_schema is unusable: {task_type.broken}"
                )
            ]
        )
    return task_type


def check_payloads(
    checks: Sequence[tuple[str, TaskType, dict[str, Any]]], progress: list[int]
) -> list[InvalidRequest]:
    """Each ``(prefix, type, payload)`` against its type's schema: one error per bad payload.

    Slow on purpose-built input: run it through :class:`taskq.enqueue.offload.Offload`;
    ``progress[0]`` says which payload it was checking when it was interrupted.
    """
    errors = []
    for index, (prefix, task_type, payload) in enumerate(checks):
        progress[0] = index
        try:
            found = schemas.payload_errors(task_type.validator, payload)
        except RecursionError:  # a recursive schema walking a deep payload
            found = ("", "nested too deeply for the type's schema")
        except (Unresolvable, ValueError) as exc:  # a $ref to nowhere; a pattern RE2 refuses
            message = f"the type's payload_schema is broken: {schemas.cut(str(exc))}"
            errors.append(InvalidRequest([FieldError(prefix + "type", message)]))
            continue
        if found is not None:
            errors.append(InvalidRequest([FieldError(f"{prefix}payload{found[0]}", found[1])]))
    return errors


def check_deadline(count: int) -> float:
    return CHECK_SECONDS + CHECK_SECONDS_PER_PAYLOAD * count
