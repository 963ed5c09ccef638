"""The records the store takes and gives back that are its own, not the model's: a
new task and its unique key, a worker as its heartbeat shows it, what an enqueue did.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from taskq.model import EnqueueOutcome, OwedPublish


@dataclass(frozen=True, slots=True)
class NewTask:
    """One validated enqueue request; ``None`` fields take the task type's default."""

    id: uuid.UUID
    type: str
    payload_json: str
    queue: str | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None
    timeout: float | None = None
    run_at: datetime | None = None
    delay: float | None = None
    traceparent: str | None = None
    # None: not unique. One field, not four: every enqueue builds a NewTask.
    unique: UniqueKey | None = None


@dataclass(frozen=True, slots=True)
class NewWorkflow:
    """One validated workflow (``taskq.enqueue.graphs.plan``): its options, and a task
    per node with the node's name and its parents' places in ``tasks`` (in the order
    of its ``depends_on``)."""

    id: uuid.UUID
    name: str | None
    on_failure: str
    idempotency_key: str | None
    fingerprint: str | None
    tasks: Sequence[NewTask]
    names: Sequence[str]
    parents: Sequence[Sequence[int]]


@dataclass(frozen=True, slots=True)
class UniqueKey:
    """What a unique task's row says of its key (taskq.unique): the key it holds
    (``<type>/<key>``), the states that hold it (``while``), how long at most (seconds),
    and whether a duplicate replaces the holder's payload and run_at (debounce)."""

    key: str
    while_: str
    for_seconds: float | None
    replace: bool


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the worker list (``workers``) shows about one worker process."""

    id: str
    hostname: str
    pid: int
    queues: Sequence[str]
    concurrency: int
    prefetch: int
    heartbeat_seconds: float


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What the store did with one :class:`NewTask` (see :class:`EnqueueOutcome`).

    ``answer`` is the enqueue's answer (:data:`ANSWER_FIELDS`, the body
    ``POST /enqueue`` returns) for created and replayed tasks, and the existing
    task's for a conflict; ``delay`` is the time left until the task is due and
    ``generation`` the row's publish generation, and ``traceparent`` the enqueuer's
    trace context, all for the publish.
    """

    outcome: EnqueueOutcome
    answer: dict[str, Any] | None = None
    delay: float = 0.0
    generation: int = 0
    traceparent: str | None = None
    republish: bool = False

    @property
    def owes_publish(self) -> bool:
        """Whether a publish is owed for it: a created task, or a replaced one whose run_at
        moved earlier than its envelope's."""
        return self.outcome is _CREATED or self.republish

    @property
    def task_id(self) -> uuid.UUID:
        """The id of the task that answers (created, replayed or in conflict)."""
        assert self.answer is not None
        task_id: uuid.UUID = self.answer["id"]
        return task_id

    def owed(self) -> OwedPublish:
        """The publish a created task is owed."""
        answer = self.answer
        assert answer is not None
        return OwedPublish.created(
            answer["id"], answer["type"], answer["queue"], self.generation, self.delay,
            self.traceparent,
        )  # fmt: skip


_CREATED = EnqueueOutcome.CREATED

ANSWER_FIELDS = (
    "id",
    "type",
    "queue",
    "status",
    "attempts",
    "max_attempts",
    "run_at",
    "created_at",
)


def _answer(row: Mapping[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in ANSWER_FIELDS}


def _duplicate(row: Mapping[str, Any], replaced: bool) -> dict[str, Any]:
    """The answer to an enqueue whose unique key ``row`` holds."""
    return {**_answer(row), "duplicate": True, "replaced": replaced}
