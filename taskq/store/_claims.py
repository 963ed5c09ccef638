"""A worker's statements: claims, heartbeats, progress and outcomes, each for a whole batch."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg

from taskq.model import (
    STATUS_BY_TEXT,
    ClaimedTask,
    Handoff,
    OwedPublish,
    TaskStatus,
    Unclaimed,
    claim_from_row,
)
from taskq.ratelimits import CLAIM_AHEAD_SECONDS, HOLD_SECONDS
from taskq.store._base import _columns, _owed
from taskq.store._gates import GatesStore
from taskq.store._records import WorkerInfo


class ClaimsStore(GatesStore):
    """Claims and what follows them: heartbeats, progress, outcomes."""

    # Every method takes a whole batch and runs one statement. Outcome batches
    # are sorted by id so that concurrent statements of one worker (outcomes,
    # heartbeat) lock rows in the same order and cannot deadlock. Heartbeats
    # and outcomes name each claim by (id, claim token) and change nothing for
    # a claim that has been taken over: its token is gone from the row.

    async def claim(
        self, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> list[ClaimedTask | Unclaimed]:
        """Claim deliveries: one record per distinct id, claimed or not and why
        (see ``claim`` SQL)."""
        async with self._connection() as connection:
            return await self._claim_on(connection, ids, worker_id, lease)

    @asynccontextmanager
    async def claim_open(
        self, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> AsyncIterator[OpenClaim]:
        """Claim deliveries as :meth:`claim` does, in a transaction that stays open
        until the ``async with`` block ends: it commits then, or rolls back (the
        claim never happened) if the block raises. See :class:`OpenClaim`."""
        async with self._connection() as connection, connection.transaction():
            claims = await self._claim_on(connection, ids, worker_id, lease)
            yield OpenClaim(self, connection, claims)

    async def _claim_on(
        self, connection: asyncpg.Connection, ids: Sequence[uuid.UUID], worker_id: str, lease: float
    ) -> list[ClaimedTask | Unclaimed]:
        """The ``claim`` statement, then ``claim_gated`` for the rows of gated types
        it left (none unless a type is paused or limited): two statements for those,
        so that the one every batch runs stays small enough for a generic plan."""
        rows = await connection.fetch(self.q["claim"], sorted(ids), worker_id, lease)
        gated = sorted(row["id"] for row in rows if row["decision"] == "gated")
        if gated:
            rows = [row for row in rows if row["decision"] != "gated"]
            rows += await connection.fetch(
                self.q["claim_gated"], gated, worker_id, lease, HOLD_SECONDS, CLAIM_AHEAD_SECONDS
            )
        return [claim_from_row(row) for row in rows]

    async def heartbeat(
        self, claims: Sequence[tuple[uuid.UUID, uuid.UUID]], worker: WorkerInfo, lease: float
    ) -> dict[uuid.UUID, bool]:
        """Record the worker alive and extend the leases of its claims ``(id, token)``.

        Returns the tokens of the claims it still holds, each mapped to whether
        an operator asked to cancel the task.
        """
        ids, tokens = _columns(sorted(claims), 2)
        rows = await self._fetch(
            "heartbeat",
            ids,
            worker.id,
            lease,
            worker.hostname,
            worker.pid,
            list(worker.queues),
            worker.concurrency,
            worker.prefetch,
            worker.heartbeat_seconds,
            tokens,
        )
        return {row["claim_token"]: row["cancel_requested"] for row in rows}

    async def write_progress(
        self, items: Sequence[tuple[uuid.UUID, int, float, str | None]]
    ) -> None:
        """Record the latest progress of tasks ``(id, attempt, fraction, details_json)``,
        each id once."""
        await self._execute("progress_write", *_columns(sorted(items), 4))

    async def worker_gone(self, worker_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(self.q["worker_gone"], worker_id)

    # Outcomes: each returns the tasks recorded, by their new status (CANCELLED if a
    # cancel was requested meanwhile); an id missing from the answer was not held by
    # that claim any more (stale). Those but complete return the publish each owes
    # (none for a CANCELLED one).

    # ``holds_slots``: some of the attempts hold a concurrency slot (their claim said
    # so); the statement then runs in a transaction that gives the slots back. With a
    # ``handoff`` (a worker's room for more, see :class:`Handoff`), the tasks those
    # slots release are claimed for that worker in the same transaction, up to its
    # room: it runs them at once, with no publish, delivery or claim of their own.

    async def complete(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
        nodes: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        """Record successes ``(id, token, result_json)``.

        ``nodes``: some are workflow nodes, whose success may release their
        children (the trigger tasks_workflow_settle, in this statement); with a
        ``handoff``, those children are claimed for its worker in the same
        transaction, up to its room (after the tasks freed slots release)."""
        async with self._connection() as connection:
            if not holds_slots and (handoff is None or not nodes):
                return await self._complete(connection, items)
            async with connection.transaction():
                if holds_slots:
                    recorded, claimed = await self._complete_releasing(connection, items, handoff)
                else:
                    recorded, claimed = await self._complete(connection, items), []
                if nodes and handoff is not None and handoff.room > len(claimed):
                    room = handoff.room - len(claimed)
                    claimed += await self._hand_over_children(connection, recorded, handoff, room)
            if handoff is not None:
                handoff.claimed = claimed
            return recorded

    async def _hand_over_children(
        self,
        connection: asyncpg.Connection,
        recorded: dict[uuid.UUID, TaskStatus],
        handoff: Handoff,
        room: int,
    ) -> list[ClaimedTask]:
        """Claim for ``handoff``'s worker, up to ``room`` of them, the workflow
        nodes that the successes ``recorded`` released in this transaction (due, of
        its queues, not published yet): it runs them at once, with no publish,
        delivery or claim of their own. The relay, woken for them at commit, finds
        them RUNNING and owes nothing."""
        done = [i for i, status in recorded.items() if status is TaskStatus.SUCCEEDED]
        if not done:
            return []
        rows = await connection.fetch(
            self.q["workflow_released"], done, sorted(handoff.queues), room
        )
        if not rows:
            return []
        # As a delivery's claim: `claim`, and `claim_gated` only for gated types.
        claims = await self._claim_on(
            connection, [row["id"] for row in rows], handoff.worker_id, handoff.lease
        )
        return [c for c in claims if isinstance(c, ClaimedTask)]

    async def _complete(
        self,
        connection: asyncpg.Connection,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        if holds_slots:
            return (await self._complete_releasing(connection, items, None))[0]
        rows = await connection.fetch(self.q["complete"], *_columns(sorted(items), 3))
        return {row[0]: STATUS_BY_TEXT[row[1]] for row in rows}

    async def _complete_releasing(
        self,
        connection: asyncpg.Connection,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        handoff: Handoff | None,
    ) -> tuple[dict[uuid.UUID, TaskStatus], list[ClaimedTask]]:
        """``complete`` and the release of the slots, in the caller's transaction."""
        rows = await connection.fetch(self.q["complete"], *_columns(sorted(items), 3))
        claimed = await self._release_slots(connection, [row[0] for row in rows], handoff)
        return {row[0]: STATUS_BY_TEXT[row[1]] for row in rows}, claimed

    async def cancel_running(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID]],
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
    ) -> list[OwedPublish]:
        """Record claims ``(id, token)`` stopped on an operator's cancel request."""
        columns = _columns(sorted(items), 2)
        return _owed(await self._ending("cancel_running", columns, holds_slots, handoff))

    async def retry(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str, float]],
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
    ) -> list[OwedPublish]:
        """Record retryable failures ``(id, token, error, delay)``."""
        return _owed(await self._ending("retry", _columns(sorted(items), 4), holds_slots, handoff))

    async def fail(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
    ) -> list[OwedPublish]:
        """Record terminal failures ``(id, token, error)``."""
        return _owed(await self._ending("fail", _columns(sorted(items), 3), holds_slots, handoff))

    async def give_back(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID]], *, holds_slots: bool = False
    ) -> list[OwedPublish]:
        """Give back unfinished claims ``(id, token)`` at shutdown; the attempt does not count."""
        return _owed(await self._ending("give_back", _columns(sorted(items), 2), holds_slots))

    async def recover_expired(self, limit: int) -> list[OwedPublish]:
        """Take back up to ``limit`` claims whose lease expired; returns them with the
        publish each owes (ENQUEUED, FAILED, or CANCELLED: nothing owed). Their
        concurrency slots are given back in the same transaction."""
        return _owed(await self._ending("recover_expired", [limit], True))

    async def overdue_enqueued(self, queue: str, seconds: float, limit: int) -> list[uuid.UUID]:
        """ENQUEUED tasks of ``queue`` published and due more than ``seconds`` ago."""
        rows = await self._fetch("overdue_enqueued", queue, seconds, limit)
        return [row["id"] for row in rows]

    async def republish(self, ids: Sequence[uuid.UUID]) -> int:
        """Mark ENQUEUED tasks' publishes owed again, for the relay to pay at once."""
        async with self._connection() as conn:
            status: str = await conn.execute(self.q["republish"], list(ids))
        return int(status.split()[-1])


class OpenClaim:
    """A claim whose transaction is still open (:meth:`Store.claim_open`): its rows are
    locked, RUNNING only for this transaction until it commits.

    Attributes:
        rows: the claim's records, as :meth:`Store.claim` returns them.
    """

    __slots__ = ("_connection", "_store", "rows")

    def __init__(
        self,
        store: ClaimsStore,
        connection: asyncpg.Connection,
        rows: list[ClaimedTask | Unclaimed],
    ) -> None:
        self._store = store
        self._connection = connection
        self.rows = rows

    async def complete(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, str]],
        *,
        holds_slots: bool = False,
        handoff: Handoff | None = None,
        nodes: bool = False,
    ) -> dict[uuid.UUID, TaskStatus]:
        """Record successes ``(id, token, result_json)`` in the claim's transaction, as
        :meth:`Store.complete` does; they commit with the claim. With ``nodes`` and a
        ``handoff``, the workflow nodes they release are claimed for its worker in
        the same transaction (``handoff.claimed``: its worker's once it commits)."""
        store = self._store
        recorded = await store._complete(self._connection, items, holds_slots=holds_slots)
        if nodes and handoff is not None and handoff.room > 0:
            handoff.claimed = await store._hand_over_children(
                self._connection, recorded, handoff, handoff.room
            )
        return recorded
