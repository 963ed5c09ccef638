"""Workflows: chains, groups with a callback and DAGs of tasks, each node run once
after the nodes it depends on have succeeded.

Build one from signatures, the typed handles' ``.s(payload, **options)``::

    flow = chain(fetch.s({"url": u}), group(resize.s({"w": 100}), resize.s({"w": 800})),
                 publish.s({}))
    result = await client.enqueue_workflow(flow, name="thumbnails")

``chain(a, b, c)`` runs its steps one after the other; ``group(a, b)`` runs its
members side by side, and whatever follows a group in a chain (its *callback*)
runs once all of them have succeeded, with their results in the group's order in
``ctx.parent_results``. Any other graph is a :class:`Workflow` with explicit
dependencies::

    flow = Workflow(on_failure="continue")
    a = flow.add(fetch.s({...}))
    b = flow.add(resize.s({...}), after=[a])

Each builds the body of ``POST /workflows`` (:meth:`Workflow.body`), which the
client checks as the API does (:mod:`taskq.enqueue.graphs`). The database releases
each node in the transaction that records the end of its last parent (migration
0019); nothing polls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from taskq.payloads import to_payload

if TYPE_CHECKING:
    from taskq.definitions import TaskDefinition

OnFailure: TypeAlias = Literal["fail_fast", "continue"]


class WorkflowStatus(StrEnum):
    """Where a workflow is; the ``workflows.status`` column (moved by the database
    as its nodes end, see migration 0019)."""

    RUNNING = "RUNNING"
    """Some node has not ended."""
    SUCCEEDED = "SUCCEEDED"
    """Every node succeeded."""
    FAILED = "FAILED"
    """Every node has ended, and one of them FAILED."""
    CANCELLED = "CANCELLED"
    """Every node has ended: the workflow was cancelled, or a node was (and none failed)."""


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """A workflow as ``GET /workflows`` shows it: its counts of nodes by end."""

    id: uuid.UUID
    name: str | None
    status: WorkflowStatus
    on_failure: str
    nodes: int
    succeeded: int
    failed: int
    cancelled: int
    idempotency_key: str | None
    cancel_requested_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkflowRecord:
        return cls(**{**dict(row), "status": WorkflowStatus(row["status"])})

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "on_failure": self.on_failure,
            "counts": {
                "nodes": self.nodes,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "cancelled": self.cancelled,
            },
            "idempotency_key": self.idempotency_key,
            "cancel_requested_at": self.cancel_requested_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
        }


@dataclass(frozen=True, slots=True)
class WorkflowNode:
    """A node of a workflow and its task, as ``GET /workflows/{id}`` shows it."""

    name: str
    task_id: uuid.UUID
    type: str | None
    queue: str | None
    status: str | None
    wait_reason: str | None
    attempts: int | None
    max_attempts: int | None
    parents_left: int
    skipped: bool
    last_error: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    depends_on: tuple[str, ...]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkflowNode:
        return cls(**{**dict(row), "depends_on": tuple(row["depends_on"])})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task_id": self.task_id,
            "type": self.type,
            "queue": self.queue,
            # None: retention deleted the task.
            "status": self.status,
            "wait_reason": self.wait_reason,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "parents_left": self.parents_left,
            "skipped": self.skipped,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "depends_on": list(self.depends_on),
        }


@dataclass(frozen=True)
class WorkflowResult:
    """The answer to an enqueue of a workflow.

    Attributes:
        created: False for an idempotent replay (the workflow existed already).
        workflow: as ``POST /workflows`` answers: ``id``, ``name``, ``status``,
            ``on_failure`` and ``nodes``, each node's ``name``, ``task_id``,
            ``type``, ``queue`` and ``status``.
    """

    created: bool
    workflow: dict[str, Any]

    @property
    def id(self) -> uuid.UUID:
        value = self.workflow["id"]
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))

    @property
    def tasks(self) -> dict[str, uuid.UUID]:
        """Each node's task id, by the node's name."""
        return {
            node["name"]: node["task_id"]
            if isinstance(node["task_id"], uuid.UUID)
            else uuid.UUID(str(node["task_id"]))
            for node in self.workflow["nodes"]
        }


# ---------------------------------------------------------------- building them


class Signature:
    """One node to be: a task type, its payload and the options of one enqueue
    (``queue``, ``max_attempts``, ``timeout``, ``delay``, ``run_at``), and optionally
    the node's ``name`` (default: its type, then ``<type>#2``, ``#3``...).

    What ``definition.s(payload, ...)`` returns; ``Signature("type.v1", {...})`` names
    the type by its name. ``a | b`` is ``chain(a, b)``.
    """

    __slots__ = ("name", "options", "payload", "task")

    def __init__(
        self,
        task: TaskDefinition[Any, Any] | str,
        payload: Any,
        *,
        name: str | None = None,
        **options: Any,
    ) -> None:
        self.task = task
        self.payload = payload
        self.name = name
        self.options = options

    @property
    def type(self) -> str:
        return self.task if isinstance(self.task, str) else self.task.name

    def node(self) -> dict[str, Any]:
        """The node's body (without its name and depends_on)."""
        task = self.task
        payload = (
            to_payload(self.payload) if isinstance(task, str) else task.to_payload(self.payload)
        )
        return {"type": self.type, "payload": payload, **self.options}

    def __or__(self, other: Step) -> Chain:
        return chain(self, other)

    def __repr__(self) -> str:
        return f"<Signature {self.type!r}>"


@dataclass(frozen=True, slots=True)
class Chain:
    """Steps run one after the other (see :func:`chain`)."""

    steps: tuple[Step, ...]

    def __or__(self, other: Step) -> Chain:
        return chain(self, other)


@dataclass(frozen=True, slots=True)
class Group:
    """Members run side by side (see :func:`group`)."""

    members: tuple[Step, ...]

    def __or__(self, other: Step) -> Chain:
        return chain(self, other)

    def then(self, callback: Step) -> Chain:
        """The group followed by ``callback``, run once every member has succeeded."""
        return chain(self, callback)


Step: TypeAlias = Signature | Chain | Group


def chain(*steps: Step) -> Chain:
    """Run ``steps`` one after the other: each starts once the one before has succeeded
    (all of a group's members), and reads its results in ``ctx.parent_results``."""
    if not steps:
        raise ValueError("a chain needs at least one step")
    return Chain(tuple(_step(s) for s in steps))


def group(*members: Step | Iterable[Step]) -> Group:
    """Run ``members`` side by side (``group(a, b)`` or ``group([a, b])``). What follows
    the group in a chain is its callback: it runs once all have succeeded, and gets
    their results in this order."""
    flat: list[Step] = []
    for member in members:
        if isinstance(member, Signature | Chain | Group):
            flat.append(member)
        else:
            flat.extend(_step(m) for m in member)
    if not flat:
        raise ValueError("a group needs at least one member")
    return Group(tuple(flat))


def _step(step: Any) -> Step:
    if not isinstance(step, Signature | Chain | Group):
        raise TypeError(f"not a step of a workflow: {step!r} (use definition.s(payload))")
    return step


@dataclass
class Workflow:
    """A workflow built node by node, with explicit dependencies.

    Args:
        name: a name to find it by (``GET /workflows?name=``).
        on_failure: ``fail_fast`` (default): a node that fails cancels every node not
            started; ``continue``: only those that depend on it.
    """

    name: str | None = None
    on_failure: OnFailure = "fail_fast"
    _nodes: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _names: set[str] = field(default_factory=set, repr=False)
    # The next number to try for each type's default name (a group of n nodes of one
    # type names them in O(n), not O(n**2)).
    _next: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, step: Step, *, after: Sequence[str] = ()) -> str:
        """Add ``step`` (a signature, or a chain or group) after the nodes ``after``
        (their names, as :meth:`add` returned them). Returns the name of the node
        that ends it (a group's: its members' names, joined by the caller with
        ``after=[*a, *b]``, so only a signature or a chain ending in one is usual).

        Raises:
            ValueError: if a group ends ``step`` (give its members' names instead).
        """
        tails = self._lay(_step(step), list(after))
        if len(tails) != 1:
            raise ValueError("add() of a group: add its members, or chain it to a callback")
        return tails[0]

    def add_all(self, step: Step, *, after: Sequence[str] = ()) -> list[str]:
        """Add ``step`` after ``after``; returns the names of the nodes that end it."""
        return self._lay(_step(step), list(after))

    def _lay(self, step: Step, after: list[str]) -> list[str]:
        """Add ``step``'s nodes depending on ``after``; returns the names it ends with."""
        if isinstance(step, Signature):
            name = step.name or self._name(step.type)
            if name in self._names:
                raise ValueError(f"two nodes named {name!r}")
            self._names.add(name)
            self._nodes.append({"name": name, **step.node(), "depends_on": list(after)})
            return [name]
        if isinstance(step, Chain):
            tails = after
            for inner in step.steps:
                tails = self._lay(inner, tails)
            return tails
        ends: list[str] = []
        for member in step.members:
            ends += self._lay(member, after)
        return ends

    def _name(self, base: str) -> str:
        if base not in self._names:
            return base
        n = self._next.get(base, 2)
        while f"{base}#{n}" in self._names:
            n += 1
        self._next[base] = n + 1
        return f"{base}#{n}"

    def body(self, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """The workflow as ``POST /workflows`` takes it."""
        body: dict[str, Any] = {"nodes": list(self._nodes), "on_failure": self.on_failure}
        if self.name is not None:
            body["name"] = self.name
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return body


def workflow_body(
    flow: Step | Workflow | Mapping[str, Any],
    *,
    name: str | None = None,
    on_failure: OnFailure | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The body of ``POST /workflows`` for a chain, group, signature or
    :class:`Workflow` (or such a body already, the options given applied)."""
    if isinstance(flow, Mapping):
        body = dict(flow)
    else:
        if not isinstance(flow, Workflow):
            built = Workflow()
            built._lay(_step(flow), [])
            flow = built
        body = flow.body()
    if name is not None:
        body["name"] = name
    if on_failure is not None:
        body["on_failure"] = on_failure
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    return body
