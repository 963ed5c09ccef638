"""The domain's words: task statuses, the decisions and outcomes that move a task, and
the typed records that cross the store's boundary.

Every row the store reads leaves it as one of the immutable records below, built
by its ``from_row`` (the only place that knows a query's column names); the rest
of taskq reads attributes, which strict mypy checks.

A record is built for every task a worker claims and every publish, so the
records of the hot path (:class:`ClaimedTask`, :class:`Unclaimed`,
:class:`OwedPublish`) must cost next to nothing: they are typed named tuples,
built straight from the row's columns by position, in the order their queries
list them (:data:`COLUMNS`, checked against each query in a test), with no
validation. A frozen dataclass costs several times as much to build (its
``__init__`` sets each field through ``object.__setattr__``); the records read
elsewhere are frozen slotted dataclasses.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple


class TaskStatus(StrEnum):
    """Where a task is in its life; the ``tasks.status`` column.

    ENQUEUED → RUNNING → SUCCEEDED | FAILED | CANCELLED, and RUNNING → ENQUEUED
    for a retry or a task given back; ENQUEUED → WAITING → ENQUEUED while a gate
    (a paused type, a concurrency limit) holds it.
    """

    ENQUEUED = "ENQUEUED"
    """Waiting for a worker: set by an enqueue, a retry, a worker giving the task back
    at shutdown, the sweeper recovering an expired lease, an operator's retry or replay,
    and the release of a WAITING task."""
    WAITING = "WAITING"
    """Held back by a gate (:class:`WaitReason`): visible and cancellable, never claimed,
    no envelope in the broker. Set by the claim (which parks it) or a workflow's
    enqueue (a node with parents); released to ENQUEUED by a resume of its type, a
    concurrency slot of its key freed, or its workflow parents' success."""
    RUNNING = "RUNNING"
    """Claimed by a worker, under its lease: set by the claim."""
    SUCCEEDED = "SUCCEEDED"
    """The handler returned: set by the worker recording the outcome. Terminal."""
    FAILED = "FAILED"
    """No attempt left, or the handler failed for good: set by the worker, the claim
    (attempts exhausted) or the sweeper (lease expired on the last attempt). Terminal;
    its envelope is owed to the dead-letter queue."""
    CANCELLED = "CANCELLED"
    """An operator cancelled it (or purged its queue): set by the admin API, or by the
    worker or sweeper ending an attempt whose cancel was requested. Terminal."""

    @property
    def terminal(self) -> bool:
        """Whether nothing moves the task on by itself any more."""
        return self in TERMINAL


TERMINAL: Final = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class WaitReason(StrEnum):
    """Why a WAITING task may not be claimed; the ``tasks.wait_reason`` column."""

    PAUSED = "paused"
    """Its type is paused (``POST /types/{name}/pause``): released by the resume."""
    CONCURRENCY = "concurrency"
    """Its concurrency key had no free slot: released, oldest first, when one frees."""
    PARENTS = "parents"
    """A workflow's node whose parents have not all succeeded: released when the last
    of them does, in the statement that records it (migration 0019)."""


STATUSES: Final = tuple(TaskStatus)
# The statuses as plain text, for JSON object keys (orjson takes str keys only).
STATUS_NAMES: Final = tuple(s.value for s in TaskStatus)
# A column's text to its member: a dict lookup, cheaper than calling the enum.
STATUS_BY_TEXT: Final[Mapping[str, TaskStatus]] = {s.value: s for s in TaskStatus}
_STATUS = STATUS_BY_TEXT


_WAIT_REASON: Final[Mapping[str | None, WaitReason]] = {r.value: r for r in WaitReason}


class ClaimDecision(StrEnum):
    """What the ``claim`` statement decided for one delivered envelope."""

    CLAIMED = "claimed"
    """Now RUNNING under this worker's lease, attempts + 1: run the handler."""
    TERMINAL = "terminal"
    """SUCCEEDED, FAILED or CANCELLED already: drop the delivery."""
    DUPLICATE = "duplicate"
    """RUNNING under a live lease (or with a cancel requested), or a second delivery of
    an id in the same batch: the lease holder or the sweeper owns it; drop it."""
    EARLY = "early"
    """Not due yet: send it back through the delay levels for the remaining time."""
    LIMITED = "limited"
    """Over its type's rate limit: its run_at moved to the start slot its limiter
    reserved for it (attempts unchanged); send it back through the delay levels,
    as *early*. At its slot it is claimed without taking a second slot."""
    EXHAUSTED = "exhausted"
    """No attempt left: now FAILED, its envelope owed to the dead-letter queue."""
    PARKED = "parked"
    """WAITING (parked now, or already): its type is paused or its concurrency key has
    no free slot. Drop the delivery: the task is published again when released."""
    MISSING = "missing"
    """No such task: the envelope goes to the dead-letter queue."""


_DECISION: Final[Mapping[str, ClaimDecision]] = {d.value: d for d in ClaimDecision}


class EnqueueOutcome(StrEnum):
    """What the store did with one enqueue request."""

    CREATED = "created"
    """A new task."""
    REPLAYED = "replayed"
    """Its idempotency key exists with the same request: the existing task answers."""
    CONFLICT = "conflict"
    """Its idempotency key exists with another request (a 409)."""
    UNKNOWN_TYPE = "unknown_type"
    """Its task type is not registered, or is disabled."""
    DUPLICATE = "duplicate"
    """Its unique key is held by another task, which answers; nothing was created."""
    REPLACED = "replaced"
    """Its unique key is held by a task not yet started, which took its payload and
    run_at (debounce); nothing was created."""

    @property
    def refused(self) -> bool:
        """Whether the request was refused (nothing was created and nothing answers)."""
        return self in (EnqueueOutcome.CONFLICT, EnqueueOutcome.UNKNOWN_TYPE)


class RequestOutcome(StrEnum):
    """How one enqueue request ended: the ``outcome`` label of ``taskq_enqueue_total``.

    The store's :class:`EnqueueOutcome` where the request reached it, named alike;
    a request refused before (a field at fault, an unknown or disabled type)
    is ``invalid``.
    """

    CREATED = "created"
    """A new task (201)."""
    REPLAYED = "replayed"
    """Its idempotency key answered with the existing task (200)."""
    DUPLICATE = "duplicate"
    """Its unique key is held by another task, which answers."""
    REPLACED = "replaced"
    """Its unique key is held by a task not yet started, which took its payload."""
    CONFLICT = "conflict"
    """Its idempotency key was used with another request (409)."""
    INVALID = "invalid"
    """Refused before the store wrote anything (400)."""


class OutcomeKind(StrEnum):
    """How an attempt ended, as the worker records it (one statement per kind)."""

    COMPLETE = "complete"
    """The handler returned: SUCCEEDED with its result."""
    RETRY = "retry"
    """It failed with attempts left: ENQUEUED again after the backoff."""
    FAIL = "fail"
    """It failed for good: FAILED, to the dead-letter queue."""
    GIVE_BACK = "give_back"
    """The worker shut down first: ENQUEUED again; the attempt does not count."""
    CANCEL = "cancel"
    """An operator's cancel stopped it: CANCELLED."""

    @property
    def label(self) -> str:
        """The ``outcome`` label of the processed-tasks metric."""
        return _OUTCOME_LABEL[self]


_OUTCOME_LABEL: Final[Mapping[OutcomeKind, str]] = {
    OutcomeKind.COMPLETE: "succeeded",
    OutcomeKind.RETRY: "retried",
    OutcomeKind.FAIL: "failed",
    OutcomeKind.GIVE_BACK: "given_back",
    OutcomeKind.CANCEL: "cancelled",
}


class StopReason(StrEnum):
    """Why the worker stopped waiting for a running handler (it then cancels the
    handler's asyncio task, or abandons its thread)."""

    TIMEOUT = "timeout"
    """The handler's timeout passed: a failed attempt."""
    SHUTDOWN = "shutdown"
    """The worker shuts down: the task is given back."""
    CANCEL = "cancel"
    """An operator's cancel had its grace: the task is recorded CANCELLED."""
    LOST = "lost"
    """The lease was lost to another claim: nothing is recorded."""

    @property
    def after(self) -> str:
        """The end of "the handler goes on after ...", for the abandoned-handler log line."""
        return _STOP_AFTER[self]


_STOP_AFTER: Final[Mapping[StopReason, str]] = {
    StopReason.TIMEOUT: "its timeout",
    StopReason.SHUTDOWN: "the shutdown grace",
    StopReason.CANCEL: "a cancel",
    StopReason.LOST: "its lease was lost",
}


class DeadLetterReason(StrEnum):
    """Why an envelope went to the dead-letter queue (the dead-lettered metric's label)."""

    FAILED = "failed"
    """The handler failed for good, or on its last attempt."""
    EXHAUSTED = "exhausted"
    """No attempt was left when it was claimed or its lease expired."""
    MISSING = "missing"
    """No task has the envelope's id."""


# ---------------------------------------------------------------- hot-path records

# The columns each hot-path record's ``from_row`` reads by position, in order,
# by the queries that return them (checked against the prepared statements).
COLUMNS: Final[Mapping[str, Sequence[str]]] = {
    "claim": (
        "id", "decision", "type", "queue", "payload", "attempts", "max_attempts",
        "timeout_seconds", "run_at", "created_at", "claim_token", "last_error", "generation",
        "delay", "traceparent", "concurrency_key", "workflow_id",
    ),
    "owed": (
        "id", "type", "queue", "status", "attempts", "last_error", "generation", "delay",
        "traceparent",
    ),
}  # fmt: skip
# The queries whose rows are OwedPublish records.
OWED_QUERIES: Final = (
    "publish_owed",
    "publish_set_aside_due",
    "publish_owed_ids",
    "recover_expired",
    "requeue",
    "retry",
    "fail",
    "give_back",
    "cancel_running",
    "schedule_fire",
)


# Builds a named tuple from its fields in one call, without the keyword-taking __new__
# a NamedTuple class defines (half the cost).
_new = tuple.__new__


class OwedPublish(NamedTuple):
    """A publish a task is owed after a commit: ENQUEUED rows to their work queue (after
    ``delay`` seconds), FAILED rows to the dead-letter queue with ``last_error`` as the
    reason. ``generation`` names the publish, so a confirm marks only this one paid.
    ``traceparent`` is the enqueuer's trace context, carried in the envelope's header
    (None: not traced).

    Every path that owes a publish hands one of these to the outbox or the relay.
    """

    id: uuid.UUID
    type: str
    queue: str
    status: TaskStatus
    attempts: int
    last_error: str | None
    generation: int
    delay: float
    traceparent: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> OwedPublish:
        """From a row of the columns ``COLUMNS["owed"]``."""
        return _new(
            cls, (row[0], row[1], row[2], _STATUS[row[3]], row[4], row[5], row[6], row[7], row[8])
        )

    @classmethod
    def created(
        cls,
        task_id: uuid.UUID,
        task_type: str,
        queue: str,
        generation: int,
        delay: float,
        traceparent: str | None = None,
    ) -> OwedPublish:
        """The first publish of a task just enqueued: to its queue after ``delay`` seconds."""
        status = TaskStatus.ENQUEUED
        return _new(
            cls, (task_id, task_type, queue, status, 0, None, generation, delay, traceparent)
        )


class ClaimedTask(NamedTuple):
    """A task this worker claimed: RUNNING under its lease, ``attempts`` counting this one.

    ``payload`` is JSON text; ``claim_token`` names the claim in heartbeats and outcomes;
    ``traceparent`` is the enqueuer's trace context (None: not traced).
    """

    id: uuid.UUID
    type: str
    queue: str
    payload: str
    attempts: int
    max_attempts: int
    timeout_seconds: float
    run_at: datetime
    created_at: datetime
    claim_token: uuid.UUID
    traceparent: str | None = None
    concurrency_key: str | None = None
    """The key whose concurrency slot the attempt holds (None: none)."""
    start_at: float = 0.0
    """When it may start, on the clock of :func:`time.monotonic` (0.0: at once): a
    rate-limited task is claimed just before its slot. Taken as the claim's rows
    arrive, from the wait the statement computed, so that the attempt's wait does
    not count the commit and the worker's time since (which vary, and would start
    it late by as much)."""
    workflow_id: uuid.UUID | None = None
    """The workflow whose node it is (None: enqueued alone)."""


class Unclaimed(NamedTuple):
    """A delivery the claim did not turn into an attempt, and why (``decision``).

    ``type``, ``queue``, ``attempts`` and ``delay`` (seconds until due, for *early* and
    *limited*)
    are None for a *missing* task; ``last_error`` and ``generation`` are set for
    *exhausted* (now FAILED and owed to the dead-letter queue); ``traceparent`` is the
    enqueuer's trace context, for the envelope published for an *early* or *exhausted* one.
    """

    id: uuid.UUID
    decision: ClaimDecision
    type: str | None = None
    queue: str | None = None
    attempts: int | None = None
    last_error: str | None = None
    generation: int | None = None
    delay: float = 0.0
    traceparent: str | None = None

    def dead_letter(self) -> OwedPublish:
        """The dead-letter publish an *exhausted* task is owed."""
        assert self.type is not None and self.queue is not None and self.attempts is not None
        assert self.generation is not None
        return OwedPublish(
            self.id, self.type, self.queue, TaskStatus.FAILED, self.attempts, self.last_error,
            self.generation, 0.0, self.traceparent,
        )  # fmt: skip


def claim_from_row(row: Sequence[Any]) -> ClaimedTask | Unclaimed:
    """One row of the ``claim`` statement (columns ``COLUMNS["claim"]``)."""
    decision = row[1]
    if decision == "claimed":
        start_at = time.monotonic() + row[13] if row[13] else 0.0
        return _new(
            ClaimedTask,
            (
                row[0], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10],
                row[14], row[15], start_at, row[16],
            ),
        )  # fmt: skip
    return _new(
        Unclaimed,
        (
            row[0], _DECISION[decision], row[2], row[3], row[5], row[11], row[12],
            row[13] or 0.0, row[14],
        ),
    )  # fmt: skip


@dataclass(slots=True)
class Handoff:
    """A worker's room to run, at once, the tasks that the concurrency slots its
    outcomes give back release (see ``Store.complete``): up to ``room`` of them, of
    its ``queues``, claimed for ``worker_id`` in the outcome's transaction. The store
    sets ``claimed`` once that transaction has committed; the worker runs them (their
    delivery skipped: they are published to nobody)."""

    worker_id: str
    lease: float
    queues: frozenset[str]
    room: int
    claimed: list[ClaimedTask] = field(default_factory=list)


# ---------------------------------------------------------------- records of the API


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as ``GET /tasks/{id}`` and the listings show it.

    ``payload`` and ``result`` are JSON text (None in a listing that did not ask for
    them); ``publish_error`` and ``publish_retry_at`` say why the relay set the owed
    publish aside and when it tries again (read by ``Store.task`` only; None in a
    listing).
    """

    id: uuid.UUID
    type: str
    queue: str
    payload: str | None
    status: TaskStatus
    attempts: int
    max_attempts: int
    idempotency_key: str | None
    result: str | None
    last_error: str | None
    timeout_seconds: float
    run_at: datetime
    lease_expires_at: datetime | None
    worker_id: str | None
    published_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    replays: int
    scheduled: bool
    wait_reason: WaitReason | None = None
    publish_error: str | None = None
    publish_retry_at: datetime | None = None
    progress: Progress | None = None
    unique: UniqueHold | None = None
    limited_by: str | None = None
    """The rate limiter it waits for (an ENQUEUED task holding a reserved slot)."""
    limited_until: datetime | None = None
    """The slot reserved for it: it starts then (its run_at)."""
    workflow_id: uuid.UUID | None = None
    """The workflow whose node it is (None: a task enqueued alone)."""

    def result_value(self) -> Any:
        """The handler's result, parsed from its JSON (None if there is none)."""
        return None if self.result is None else json.loads(self.result)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskRecord:
        """From a listing's row (``tasks_list``, ``dlq_list``)."""
        return cls(
            row["id"], row["type"], row["queue"], row["payload"], _STATUS[row["status"]],
            row["attempts"], row["max_attempts"], row["idempotency_key"], row["result"],
            row["last_error"], row["timeout_seconds"], row["run_at"], row["lease_expires_at"],
            row["worker_id"], row["published_at"], row["created_at"], row["updated_at"],
            row["started_at"], row["finished_at"], row["cancel_requested_at"], row["replays"],
            row["scheduled"], _WAIT_REASON.get(row["wait_reason"]),
        )  # fmt: skip

    @classmethod
    def from_detail_row(cls, row: Mapping[str, Any]) -> TaskRecord:
        """From a ``task_get`` row, which adds why a publish was set aside and the rate
        limiter the task waits for."""
        listed = cls.from_row(row)
        return replace(
            listed,
            publish_error=row["publish_error"],
            publish_retry_at=row["publish_retry_at"],
            progress=Progress.from_detail_row(row),
            unique=UniqueHold.from_detail_row(row),
            limited_by=row["limited_by"],
            limited_until=row["limited_until"],
            workflow_id=row["workflow_id"],
        )


@dataclass(frozen=True, slots=True)
class UniqueHold:
    """A unique task's key (``<type>/<key>``; None once released), the states that hold it
    (``queued``, ``active`` or ``until_finished``), until when at most, and whether the
    task holds it now."""

    key: str | None
    while_: str
    until: datetime | None
    held: bool

    @classmethod
    def from_detail_row(cls, row: Mapping[str, Any]) -> UniqueHold | None:
        if row.get("unique_while") is None:  # not unique (or a row from before 0011)
            return None
        return cls(row["unique_key"], row["unique_while"], row["unique_until"], row["unique_held"])


@dataclass(frozen=True, slots=True)
class Progress:
    """The latest progress a task's handler reported (``ctx.progress``).

    ``details`` is JSON text (an object) or None; ``attempt`` is the attempt that
    reported it; ``at`` is when a worker wrote it.
    """

    fraction: float
    details: str | None
    attempt: int
    at: datetime

    @classmethod
    def from_detail_row(cls, row: Mapping[str, Any]) -> Progress | None:
        """From a ``task_get`` row (None if no progress was reported)."""
        if row["progress"] is None:
            return None
        return cls(
            row["progress"], row["progress_details"], row["progress_attempt"], row["progress_at"]
        )


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """A progress report as the live stream sends it (any task's, by ascending ``seq``)."""

    seq: int
    task_id: uuid.UUID
    type: str
    queue: str
    attempt: int
    fraction: float
    details: str | None
    at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ProgressEvent:
        return cls(
            row["seq"], row["task_id"], row["type"], row["queue"], row["attempt"],
            row["fraction"], row["details"], row["updated_at"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One entry of a task's history (written by triggers on every status change)."""

    id: int
    status: TaskStatus
    previous_status: TaskStatus | None
    attempt: int
    error: str | None
    worker_id: str | None
    run_at: datetime | None
    at: datetime
    action: str | None
    actor: str | None
    reason: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskEvent:
        previous = row["previous_status"]
        return cls(
            row["id"], _STATUS[row["status"]], None if previous is None else _STATUS[previous],
            row["attempt"], row["error"], row["worker_id"], row["run_at"], row["at"],
            row["action"], row["actor"], row["reason"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A task event as the live stream sends it (any task's, by ascending ``id``)."""

    id: int
    task_id: uuid.UUID
    type: str
    queue: str
    status: TaskStatus
    attempt: int
    at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StreamEvent:
        return cls(
            row["id"], row["task_id"], row["type"], row["queue"], _STATUS[row["status"]],
            row["attempt"], row["at"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TaskTypeRecord:
    """A row of the task type registry. ``backoff`` and ``payload_schema`` are JSON text.

    ``paused``: claims park its tasks WAITING. ``concurrency``: its limit, if any.
    """

    name: str
    queue: str
    max_attempts: int
    timeout_seconds: float
    backoff: str | None
    payload_schema: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    # The type's unique (JSON text; taskq.unique), or None.
    unique_spec: str | None = None
    paused: bool = False
    concurrency: Concurrency | None = None
    limiter: str | None = None
    """The rate limiter its tasks take slots from (None: not limited)."""
    limiter_source: str | None = None
    """Who set ``limiter``: ``code`` (a handler's rate_limit=) or ``api``."""
    rate_limit: str | None = None
    """JSON text of its own limit, when ``limiter`` is the type's own."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskTypeRecord:
        limit = row["concurrency_limit"]
        concurrency = (
            None
            if limit is None
            else Concurrency(limit, row["concurrency_key"], row["concurrency_source"])
        )
        return cls(
            row["name"], row["queue"], row["max_attempts"], row["timeout_seconds"],
            row["backoff"], row["payload_schema"], row["enabled"], row["created_at"],
            row["updated_at"], row["unique_spec"], row["paused"], concurrency,
            row.get("limiter"), row.get("limiter_source"), row.get("rate_limit"),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class LimiterRecord:
    """A rate limiter (``GET /limits``): ``rate`` starts per ``per_seconds``, ``burst``
    at once, one bucket per value of payload field ``key``; ``type_name`` is set for a
    type's own; ``types`` use it; ``busy_until`` is how far its single bucket's slots,
    and the waits for one handed out, are taken (None when keyed or unused)."""

    name: str
    rate: int
    per_seconds: float
    burst: int
    key: str | None
    type_name: str | None
    created_at: datetime
    updated_at: datetime
    types: list[str]
    busy_until: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> LimiterRecord:
        return cls(
            row["name"], row["rate"], row["per_seconds"], row["burst"], row["key"],
            row["type_name"], row["created_at"], row["updated_at"], list(row["types"]),
            row["busy_until"],
        )  # fmt: skip


# The largest concurrency limit (the task_type_concurrency constraint).
MAX_CONCURRENCY: Final = 10000


@dataclass(frozen=True, slots=True)
class Concurrency:
    """A type's concurrency limit: at most ``limit`` of its tasks RUNNING per value of the
    payload field ``key`` (None: one limit for the type), across the fleet. ``source``
    says who set it: ``code`` (a handler's ``concurrency=``) or ``api``."""

    limit: int
    key: str | None = None
    source: str = "code"


@dataclass(frozen=True, slots=True)
class ConcurrencyKey:
    """A concurrency key of a type: its tasks running and waiting for a slot."""

    key: str
    running: int
    waiting: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ConcurrencyKey:
        return cls(row["key"], row["running"], row["waiting"])


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker process as the workers registry shows it."""

    id: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int
    prefetch: int
    in_flight: int
    started_at: datetime
    last_heartbeat: datetime
    alive: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkerRecord:
        return cls(
            row["id"], row["hostname"], row["pid"], list(row["queues"]), row["concurrency"],
            row["prefetch"], row["in_flight"], row["started_at"], row["last_heartbeat"],
            row["alive"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class SetAside:
    """An owed publish the relay set aside; ``newly`` if it was not set aside before."""

    id: uuid.UUID
    queue: str
    newly: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SetAside:
        return cls(row["id"], row["queue"], row["newly"])


@dataclass(frozen=True, slots=True)
class Purge:
    """A queue purge begun and not ended (see ``queue_purges``)."""

    id: int
    queue: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Purge:
        return cls(row["id"], row["queue"])


@dataclass(frozen=True, slots=True)
class QueuePause:
    """A paused work queue (``queue_pauses``): no worker consumes it until it is resumed.

    Moved there by ``POST /queues/{q}/pause`` or ``taskq queues pause``; out of it
    (the row deleted) by ``/resume``.
    """

    queue: str
    paused_at: datetime
    paused_by: str
    reason: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> QueuePause:
        return cls(row["queue"], row["paused_at"], row["paused_by"], row["reason"])


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """Tasks by status: in all, by queue and by type. Keyed by the statuses' text
    (:data:`STATUS_NAMES`, every one present), as the JSON body shows them.
    ``estimated``: the statuses whose count in ``by_status`` is the planner's
    estimate (terminal statuses of many rows); they are left out of ``by_queue``
    and ``by_type``."""

    by_status: dict[str, int]
    by_queue: dict[str, dict[str, int]]
    by_type: dict[str, dict[str, int]]
    estimated: tuple[str, ...] = ()

    @classmethod
    def from_rows(
        cls, rows: Sequence[Mapping[str, Any]], *, estimated: Mapping[str, int] | None = None
    ) -> StatusCounts:
        """From the grouping-sets rows of ``stats_counts`` (status, queue, type, n and
        which grouping column a row leaves out); with ``estimated`` (status: its
        estimate), from those of ``stats_counts_others``, which skipped them."""
        estimated = estimated or {}
        names = tuple(n for n in STATUS_NAMES if n not in estimated)
        listed = tuple(n for n in STATUS_NAMES if n in estimated)
        counts = cls(dict.fromkeys(STATUS_NAMES, 0), {}, {}, listed)
        counts.by_status.update(estimated)
        for row in rows:
            status, n = _STATUS[row["status"]].value, row["n"]
            if not row["no_queue"]:
                by_queue = counts.by_queue.setdefault(row["queue"], dict.fromkeys(names, 0))
                by_queue[status] = n
            elif not row["no_type"]:
                by_type = counts.by_type.setdefault(row["type"], dict.fromkeys(names, 0))
                by_type[status] = n
            else:
                counts.by_status[status] = n
        return counts


@dataclass(frozen=True, slots=True)
class Throughput:
    """Over a recent window: tasks created and finished, and percentiles of queue wait
    (due to start) and duration (start to finish), in seconds (None: no task)."""

    enqueued: int
    succeeded: int
    failed: int
    wait_p50: float | None
    wait_p95: float | None
    duration_p50: float | None
    duration_p95: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Throughput:
        return cls(
            row["enqueued"], row["succeeded"], row["failed"], row["wait_p50"], row["wait_p95"],
            row["duration_p50"], row["duration_p95"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Stats:
    """What ``GET /stats`` reads from the database."""

    counts: StatusCounts
    scheduled: int
    window: Throughput
    waiting: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """WAITING tasks by type, then by wait reason."""
    paused_types: Sequence[str] = ()


# ---------------------------------------------------------------- query parameters


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a listing shows; None matches all."""

    statuses: Sequence[TaskStatus] | None = None
    type: str | None = None
    queue: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    scheduled: bool | None = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a keyset-paginated listing goes on: after the task ``id`` whose sort time
    (``created_at`` for tasks, ``finished_at`` for the dead-letter listing) is ``at``."""

    at: datetime
    id: uuid.UUID


# ---------------------------------------------------------------- schedules


class CatchUp(StrEnum):
    """What a schedule does with the fires it missed while no sweeper ran."""

    SKIP = "skip"  # none of them; only a fire due within the grace period still happens
    ONCE = "once"  # one task for all of them, at the latest missed fire
    ALL = "all"  # a task for each, the latest ``catch_up_limit`` of them


class Overlap(StrEnum):
    """Whether a schedule fires while the task of its previous fire is not finished."""

    ALLOW = "allow"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A row of ``schedules``: when it fires (``cron`` in ``timezone``, or every
    ``every_seconds``), what it enqueues, and what it did so far."""

    name: str
    cron: str | None
    timezone: str
    every_seconds: float | None
    type: str
    payload: str  # JSON text
    queue: str | None
    catch_up: CatchUp
    catch_up_limit: int
    overlap: Overlap
    paused: bool
    source: str
    next_fire_at: datetime
    last_fire_at: datetime | None
    last_task_id: uuid.UUID | None
    last_task_status: TaskStatus | None
    fires: int
    skipped: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    created: bool  # by the statement that returned it

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ScheduleRecord:
        status = row["last_task_status"]
        return cls(
            row["name"], row["cron"], row["timezone"], row["every_seconds"], row["type"],
            row["payload"], row["queue"], CatchUp(row["catch_up"]), row["catch_up_limit"],
            Overlap(row["overlap"]), row["paused"], row["source"], row["next_fire_at"],
            row["last_fire_at"], row["last_task_id"],
            None if status is None else TaskStatus(status), row["fires"], row["skipped"],
            row["last_error"], row["created_at"], row["updated_at"], row["created"],
        )  # fmt: skip

    @property
    def finished_previous(self) -> bool:
        """Whether the task of the latest fire is finished (or gone, or there is none)."""
        status = self.last_task_status
        return status is None or status.terminal


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What a schedule is, as ``PUT /schedules/{name}`` or a handler's ``schedule=``
    declares it (validated by :func:`taskq.fleet.scheduler.schedule_spec`)."""

    name: str
    cron: str | None
    timezone: str
    every_seconds: float | None
    type: str
    payload: str  # JSON text
    queue: str | None
    catch_up: CatchUp
    catch_up_limit: int
    overlap: Overlap
    source: str  # "api" or "code"


@dataclass(frozen=True, slots=True)
class ScheduleFire:
    """The fires of one schedule that the store enqueues in one statement."""

    name: str
    expected_next_fire_at: datetime
    manual: bool
    ids: list[uuid.UUID]
    idempotency_keys: list[str]
    next_fire_at: datetime
    last_fire_at: datetime | None
    skipped: int
    fingerprint: str
