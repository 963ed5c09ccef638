"""Gates: paused types and concurrency limits, and the release of the tasks that
wait WAITING behind them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from taskq.model import ClaimedTask, ConcurrencyKey, Handoff, TaskTypeRecord, claim_from_row
from taskq.ratelimits import CLAIM_AHEAD_SECONDS, HOLD_SECONDS
from taskq.store._base import StoreBase
from taskq.store._callers import _Asyncpg

log = logging.getLogger("taskq.store")

# Tasks a resume releases per transaction.
RELEASE_BATCH = 1000
# Statements a release of free slots runs at most, and the pause before each retry (s).
PROMOTE_TRIES = 5
PROMOTE_PAUSE = 0.005


class GatesStore(StoreBase):
    """Pausing and resuming types; releasing the tasks that wait for a resume or a
    concurrency slot."""

    # WAITING tasks are released in the transaction that frees them, with the relay
    # woken for them at its commit (as an enqueue in a caller's transaction wakes it).

    async def pause_type(self, name: str, paused: bool) -> TaskTypeRecord | None:
        """Pause or resume a type (None: no such type). Resuming releases its parked
        tasks, in batches of :data:`RELEASE_BATCH`, once the resume has committed."""
        row = await self._fetchrow("type_pause", name, paused)
        if row is None:
            return None
        if not paused:
            await self.release_paused(name)
        return TaskTypeRecord.from_row(row)

    async def release_paused(self, name: str, batches: int | None = None) -> int:
        """Release the tasks a pause of ``name`` parked, if it is not paused (any more),
        in transactions of :data:`RELEASE_BATCH` each, at most ``batches`` of them
        (None: until none is left); returns how many."""
        released = 0
        while batches is None or batches > 0:
            async with self._connection() as connection, connection.transaction():
                rows = await connection.fetch(self.q["type_release_paused"], name, RELEASE_BATCH)
                await self._notify([r["id"] for r in rows], _Asyncpg(connection, self.q))
            released += len(rows)
            if len(rows) < RELEASE_BATCH:
                break
            batches = None if batches is None else batches - 1
        return released

    async def promote_type(self, name: str, keys: Sequence[str] | None = None) -> int:
        """Release the tasks of ``name`` waiting for concurrency slots that are free
        (after its limit changed, or a release missed them), of ``keys`` or of all
        its keys; returns how many."""
        async with self._connection() as connection, connection.transaction():
            slots = await connection.fetch(
                self.q["slots_lock"], name, None if keys is None else list(keys)
            )
            return (await self._promote(connection, slots))[0]

    async def waiting_any(self) -> bool:
        """Whether any task is WAITING (an index-only probe)."""
        return bool(await self._fetchval("waiting_any"))

    async def waiting_keys(self, after: tuple[str, str], limit: int) -> list[tuple[str, str, bool]]:
        """The next ``limit`` (type, key) pairs after ``after`` with tasks WAITING for a
        concurrency slot, in order, each with whether it has room now (fewer running
        than its limit, counting the tasks released and due)."""
        rows = await self._fetch("waiting_keys", after[0], after[1], limit)
        return [(row["type"], row["key"], row["room"]) for row in rows]

    async def waiting_resumed_types(self) -> list[str]:
        """The types not paused that still have tasks a pause parked."""
        return [row["name"] for row in await self._fetch("waiting_resumed_types")]

    async def concurrency_keys(self, name: str, limit: int) -> list[ConcurrencyKey]:
        """The busiest concurrency keys of a type, with their running and waiting tasks."""
        return [
            ConcurrencyKey.from_row(row) for row in await self._fetch("slots_list", name, limit)
        ]

    async def _release_slots(
        self,
        connection: asyncpg.Connection,
        ids: Sequence[uuid.UUID],
        handoff: Handoff | None = None,
    ) -> list[ClaimedTask]:
        """Give back the concurrency slots of the attempts ``ids`` that just ended, and
        release the tasks waiting for them, in the caller's transaction; with a
        ``handoff``, claim those it can take for its worker (returned: they are its
        once the transaction commits).

        With a handoff, a slot passes straight to the oldest task waiting for it
        (``slots_handoff``): its slot row is not written, so the key's claims and
        releases do not wait for this transaction; only the slots that do not pass
        are given back, and their keys' waiting tasks released, as without one."""
        if handoff is None or handoff.room <= 0:
            given = await connection.fetch(self.q["slots_release"], list(ids))
            if not given:
                return []
            return (await self._promote(connection, given, handoff))[1]
        rows = await connection.fetch(
            self.q["slots_handoff"],
            list(ids),
            handoff.worker_id,
            handoff.lease,
            sorted(handoff.queues),
            handoff.room,
        )
        passed: list[ClaimedTask] = []
        freed: list[Mapping[str, Any]] = []
        for row in rows:
            if row["decision"] == "freed":
                freed.append({"type": row["type"], "key": row["concurrency_key"]})
            elif isinstance(task := claim_from_row(row), ClaimedTask):
                passed.append(task)
        if not freed:
            return passed
        rest = Handoff(handoff.worker_id, handoff.lease, handoff.queues, handoff.room - len(passed))
        return passed + (await self._promote(connection, freed, rest))[1]

    async def _promote(
        self,
        connection: asyncpg.Connection,
        slots: Sequence[Mapping[str, Any]],
        handoff: Handoff | None = None,
    ) -> tuple[int, list[ClaimedTask]]:
        """Release the oldest tasks waiting for the free slots of ``slots`` (locked by this
        transaction already): statements of their own, so they see what claims parked
        before the slots were locked. A key that released fewer than it had free while
        tasks still wait is tried again (see ``slots_promote``), a few times.

        Returns how many were released, and those claimed for ``handoff``'s worker:
        up to its room, of its queues, in the same transaction (``claim_gated``: each
        takes its slot again as any claim does, and owes no publish). The others are
        owed a publish, and the relay is woken for them."""
        keys = [(s["type"], s["key"]) for s in slots]
        released: list[tuple[uuid.UUID, str]] = []
        for attempt in range(PROMOTE_TRIES):
            if not keys:
                break
            if attempt:
                await asyncio.sleep(PROMOTE_PAUSE * attempt)
            rows = await connection.fetch(
                self.q["slots_promote"], [k[0] for k in keys], [k[1] for k in keys]
            )
            for row in rows:
                released += zip(row["ids"], row["queues"], strict=True)
            keys = [
                (row["type"], row["key"])
                for row in rows
                if row["more"] and len(row["ids"]) < row["free"]
            ]
        if keys:
            log.warning("tasks wait for free concurrency slots of %s: their rows were held", keys)
        claimed: list[ClaimedTask] = []
        if handoff is not None and handoff.room > 0:
            taken = [i for i, queue in released if queue in handoff.queues][: handoff.room]
            claimed = await self._hand_over(connection, taken, handoff)
        mine = {c.id for c in claimed}
        await self._notify([i for i, _ in released if i not in mine], _Asyncpg(connection, self.q))
        return len(released), claimed

    async def _hand_over(
        self, connection: asyncpg.Connection, ids: Sequence[uuid.UUID], handoff: Handoff
    ) -> list[ClaimedTask]:
        """Claim the tasks ``ids`` (released in this transaction) for ``handoff``'s
        worker, gates and all (``claim_gated``); returns those it may run. The
        others are left as the claim decided (parked, limited, early), their
        publishes owed."""
        if not ids:
            return []
        rows = await connection.fetch(
            self.q["claim_gated"],
            sorted(ids),
            handoff.worker_id,
            handoff.lease,
            HOLD_SECONDS,
            CLAIM_AHEAD_SECONDS,
        )
        return [c for c in map(claim_from_row, rows) if isinstance(c, ClaimedTask)]

    async def _ending(
        self,
        query: str,
        columns: Sequence[Any],
        holds_slots: bool,
        handoff: Handoff | None = None,
    ) -> list[asyncpg.Record]:
        """Run an outcome statement; when some of its attempts hold concurrency slots,
        in a transaction that gives them back (see :meth:`_release_slots`), and fills
        ``handoff.claimed`` once it has committed."""
        if not holds_slots:
            return await self._fetch(query, *columns)
        async with self._connection() as connection:
            async with connection.transaction():
                rows = list(await connection.fetch(self.q[query], *columns))
                claimed = await self._release_slots(connection, [row[0] for row in rows], handoff)
            if handoff is not None:
                handoff.claimed = claimed
            return rows
