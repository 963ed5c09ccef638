"""Micro benchmark: what building a typed record costs per row on the hot path.

Reads real asyncpg records (of the columns the claim and the outcome statements
return) from the database and times, per row, the record's ``from_row`` against
the dict the code built before (``{name: row[name] ...}``), with timeit.

    .venv/bin/python scripts/bench_records.py [DATABASE_URL]
"""

from __future__ import annotations

import asyncio
import re
import sys
import timeit
import uuid
from typing import Any

import asyncpg

from taskq.model import COLUMNS, EnqueueOutcome, OwedPublish, TaskStatus, claim_from_row
from taskq.store import Enqueued

NUMBER = 200_000

CLAIM = """SELECT gen_random_uuid() AS id, 'claimed' AS decision, 'email.send.v1' AS type,
    'default' AS queue, '{"to": "a"}' AS payload, 1 AS attempts, 3 AS max_attempts,
    30.0::float8 AS timeout_seconds, now() AS run_at, now() AS created_at,
    gen_random_uuid() AS claim_token, NULL::text AS last_error, NULL::bigint AS generation,
    0::float8 AS delay"""
OWED = """SELECT gen_random_uuid() AS id, 'email.send.v1' AS type, 'default' AS queue,
    'ENQUEUED' AS status, 1 AS attempts, NULL::text AS last_error, 2::bigint AS generation,
    5.0::float8 AS delay"""


def per_row(statement: str, scope: dict[str, Any]) -> float:
    """Nanoseconds per run of ``statement``, the best of 5 repeats."""
    best = min(timeit.repeat(statement, globals=scope, number=NUMBER, repeat=5))
    return best / NUMBER * 1e9


async def main(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        claim = await connection.fetchrow(CLAIM)
        owed = await connection.fetchrow(OWED)
    finally:
        await connection.close()
    assert claim is not None and owed is not None
    assert list(claim.keys()) == list(COLUMNS["claim"])
    assert list(owed.keys()) == list(COLUMNS["owed"])
    answer = {"id": uuid.uuid4(), "type": "t", "queue": "default", "status": "ENQUEUED",
              "attempts": 0, "max_attempts": 3, "run_at": None, "created_at": None}  # fmt: skip
    enqueued = Enqueued(EnqueueOutcome.CREATED, answer, 0.0, 0)
    scope = {
        "claim": claim, "owed": owed, "claim_from_row": claim_from_row,
        "from_row": OwedPublish.from_row, "enqueued": enqueued, "answer": answer,
        "status": TaskStatus.ENQUEUED,
    }  # fmt: skip
    # Each pair: what one row costs on its path now (the record, then the attribute
    # reads its consumers make) and before (the reads by name of the asyncpg record or
    # the dict the code built, as many as the consumers made).
    claim_reads = "r.id, r.claim_token, r.attempts, r.type, r.queue, r.max_attempts, r.run_at,"
    claim_reads += " r.created_at, r.payload, r.timeout_seconds, r.timeout_seconds"
    owed_reads = "r.id, r.type, r.attempts, r.status, r.queue, r.delay, r.delay, r.status, r.id,"
    owed_reads += " r.generation"

    def by_name(reads: str) -> str:
        return re.sub(r"r\.(\w+)", r"r['\1']", reads)

    rows = [
        ("claim: claim_from_row + 11 reads", f"r = claim_from_row(claim); {claim_reads}"),
        ("claim, before: 13 reads by name",
         f"r = claim; r['decision'], r['id'], {by_name(claim_reads)}"),
        ("outcome: OwedPublish.from_row + 10 reads", f"r = from_row(owed); {owed_reads}"),
        ("outcome, before: a dict of 8 + 10 reads",
         "r = {'id': owed['id'], 'type': owed['type'], 'queue': owed['queue'],"
         " 'status': status, 'attempts': owed['attempts'], 'generation': owed['generation'],"
         f" 'last_error': None, 'delay': owed.get('delay') or 0.0}}; {by_name(owed_reads)}"),
        ("enqueue: Enqueued.owed() + 10 reads", f"r = enqueued.owed(); {owed_reads}"),
        ("enqueue, before: {**answer, ...} + 10 reads",
         "r = {**answer, 'delay': 0.0, 'last_error': None, 'generation': 0};"
         f" {by_name(owed_reads)}"),
    ]  # fmt: skip
    print(f"{'per row':<46} {'ns':>7}")
    for label, statement in rows:
        print(f"{label:<46} {per_row(statement, scope):7.0f}")


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1/postgres")
    )
