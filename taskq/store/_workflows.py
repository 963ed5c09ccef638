"""Workflows: their enqueue (a row, a task per node, the edges, in one transaction),
their reads, their cancel, and a node's parents' results.

What ends a node settles its workflow in the same statement, whichever statement
that is: the trigger ``tasks_workflow_settle`` (migration 0019). Nothing here runs
on the paths of tasks enqueued alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from taskq.errors import ParentResultsTooLarge
from taskq.model import EnqueueOutcome, OwedPublish, TaskStatus
from taskq.store._base import StoreBase
from taskq.store._callers import _Asyncpg
from taskq.store._records import NewWorkflow
from taskq.workflows import WorkflowNode, WorkflowRecord


@dataclass(frozen=True, slots=True)
class WorkflowEnqueued:
    """What the store did with a :class:`NewWorkflow`: ``outcome`` is CREATED,
    REPLAYED (its idempotency key named one with the same request), CONFLICT (with
    another request) or UNKNOWN_TYPE (a node's type is unknown or disabled now:
    nothing was created; ``unknown`` is that node's place). ``workflow_id`` is the
    workflow created or found; ``owed`` the publishes of the nodes without parents."""

    outcome: EnqueueOutcome
    workflow_id: uuid.UUID | None = None
    owed: list[OwedPublish] = field(default_factory=list)
    unknown: int | None = None


class _Refused(Exception):
    def __init__(self, result: WorkflowEnqueued) -> None:
        self.result = result


class WorkflowsStore(StoreBase):
    """Enqueuing, reading and cancelling workflows."""

    async def enqueue_workflow(self, workflow: NewWorkflow) -> WorkflowEnqueued:
        """Insert a workflow and its nodes in one transaction, all or nothing."""
        tasks = workflow.tasks
        children: list[uuid.UUID] = []
        positions: list[int] = []
        parents: list[uuid.UUID] = []
        for task, own in zip(tasks, workflow.parents, strict=True):
            for position, parent in enumerate(own):
                children.append(task.id)
                positions.append(position)
                parents.append(tasks[parent].id)
        try:
            async with self._connection() as connection, connection.transaction():
                inserted = await connection.fetchval(
                    self.q["workflow_insert"],
                    workflow.id,
                    workflow.name,
                    workflow.on_failure,
                    len(tasks),
                    workflow.idempotency_key,
                    workflow.fingerprint,
                )
                if inserted is None:
                    raise _Refused(await self._existing(connection, workflow))
                rows = await connection.fetch(
                    self.q["workflow_insert_nodes"],
                    workflow.id,
                    [t.id for t in tasks],
                    list(workflow.names),
                    [t.type for t in tasks],
                    [t.queue for t in tasks],
                    [t.payload_json for t in tasks],
                    [t.max_attempts for t in tasks],
                    [t.timeout for t in tasks],
                    [t.run_at for t in tasks],
                    [t.delay for t in tasks],
                    [t.traceparent for t in tasks],
                    [len(own) for own in workflow.parents],
                    children,
                    positions,
                    parents,
                )
                if len(rows) != len(tasks):
                    found = {row["id"] for row in rows}
                    unknown = next(i for i, t in enumerate(tasks) if t.id not in found)
                    raise _Refused(WorkflowEnqueued(EnqueueOutcome.UNKNOWN_TYPE, unknown=unknown))
        except _Refused as refused:
            return refused.result
        owed = [
            OwedPublish.created(
                row["id"], row["type"], row["queue"], row["generation"], row["delay"],
                task.traceparent,
            )
            for row, task in zip(rows, tasks, strict=True)
            if row["status"] == TaskStatus.ENQUEUED
        ]  # fmt: skip
        return WorkflowEnqueued(EnqueueOutcome.CREATED, workflow.id, owed)

    async def _existing(
        self, connection: asyncpg.Connection, workflow: NewWorkflow
    ) -> WorkflowEnqueued:
        row = await connection.fetchrow(self.q["workflow_by_key"], workflow.idempotency_key)
        if row is None:  # pragma: no cover - the key's holder is never deleted meanwhile
            return WorkflowEnqueued(EnqueueOutcome.CONFLICT)
        same = row["request_fingerprint"] == workflow.fingerprint
        outcome = EnqueueOutcome.REPLAYED if same else EnqueueOutcome.CONFLICT
        return WorkflowEnqueued(outcome, row["id"])

    async def workflow(
        self, workflow_id: uuid.UUID
    ) -> tuple[WorkflowRecord, list[WorkflowNode]] | None:
        """A workflow and its nodes in their order (None: no such workflow)."""
        async with self._connection() as connection:
            row = await connection.fetchrow(self.q["workflow_get"], workflow_id)
            if row is None:
                return None
            nodes = await connection.fetch(self.q["workflow_nodes"], workflow_id)
        return WorkflowRecord.from_row(row), [WorkflowNode.from_row(n) for n in nodes]

    async def workflows(
        self,
        *,
        status: str | None,
        name: str | None,
        cursor: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[WorkflowRecord]:
        """Workflows newest first, after ``cursor`` (created_at, id)."""
        rows = await self._fetch(
            "workflows_list",
            status,
            name,
            None if cursor is None else cursor[0],
            None if cursor is None else cursor[1],
            limit,
        )
        return [WorkflowRecord.from_row(row) for row in rows]

    async def cancel_workflow(
        self, workflow_id: uuid.UUID, actor: str, reason: str | None
    ) -> bool | None:
        """Cancel a workflow: its nodes not started are CANCELLED, its running ones get a
        cancel request, and nothing more is released. Returns None for no such
        workflow, False for one that had ended already."""
        async with self._connection() as connection, connection.transaction():
            await connection.execute(self.q["admin_context"], "cancel", actor, reason)
            # Its nodes' rows before its own, as settling a node takes them.
            locked = await connection.fetch(self.q["workflow_lock_nodes"], workflow_id)
            ids = [row["id"] for row in locked]
            marked = await connection.fetchval(self.q["workflow_cancel"], workflow_id)
            if marked is None:
                found = await connection.fetchrow(self.q["workflow_get"], workflow_id)
                return None if found is None else False
            if ids:
                await connection.execute(self.q["workflow_cancel_nodes"], ids)
        return True

    async def parent_results(self, task_id: uuid.UUID, max_bytes: int) -> list[str | None]:
        """The results (JSON text) of a node's parents, in its depends_on order.

        Raises :class:`ParentResultsTooLarge` when they are more than ``max_bytes``
        of JSON text in all (none is read into memory then)."""
        rows = await self._fetch("parent_results", task_id, max_bytes)
        if rows and rows[0]["bytes"] > max_bytes:
            raise ParentResultsTooLarge(rows[0]["bytes"], max_bytes)
        return [row["result"] for row in rows]

    async def workflow_missed_any(self) -> bool:
        """Whether the settle trigger noted a node it had to skip (a probe of an
        empty table while none was)."""
        return bool(await self._fetchval("workflow_missed_any"))

    async def repair_workflows(self, limit: int) -> tuple[int, int]:
        """Decide again up to ``limit`` nodes whose release or cancel the settle
        trigger skipped (migration 0020): returns how many it released and
        cancelled. The released are published through the relay (woken here)."""
        async with self._connection() as connection, connection.transaction():
            rows = await connection.fetch(self.q["workflow_repair"], limit)
            released = [row["id"] for row in rows if row["status"] == TaskStatus.ENQUEUED]
            await self._notify(released, _Asyncpg(connection, self.q))
        return len(released), len(rows) - len(released)

    async def prune_workflows(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` workflows that ended more than ``older_than`` seconds
        ago; returns how many."""
        return await self._execute("workflows_prune", older_than, limit)

    async def workflows_by_status(self) -> dict[str, int]:
        """How many workflows there are in each status."""
        return {row["status"]: row["n"] for row in await self._fetch("workflows_by_status")}
