"""Fault scenario 9, misbehaving handlers: user code that raises what is not an
``Exception``, exits, blocks its thread past its lease, returns something huge or
ignores its cancellation, mixed with 1,000 normal tasks on two worker processes.

Every task ends terminal with the reason of its misbehaviour; both workers live
through it all (no restart needed); the normal tasks run once each, unaffected.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taskq.client import Client
from taskq.settings import Settings
from tests.support import ROOT
from tests.support.faults import Figures, all_terminal, audit, processes, worker_ready
from tests.support.worker_fixtures import harness

pytestmark = [pytest.mark.fault, pytest.mark.integration]

NORMAL = 1000
EACH = 4  # tasks of each misbehaving kind
LEASE = 2.0  # seconds; bad.block blocks its thread for 3 leases

# kind -> (type, payload, enqueue options, the status it ends in, its last_error's start)
KINDS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str, str]] = {
    "BaseException of its own": (
        "bad.base_exception", {}, {}, "FAILED", "Custom: a BaseException of its own"
    ),
    "CancelledError of its own": ("bad.cancelled", {}, {}, "FAILED", "CancelledError:"),
    "GeneratorExit": ("bad.generator_exit", {}, {}, "FAILED", "GeneratorExit:"),
    "sys.exit() in a coroutine": (
        "bad.exit", {}, {}, "FAILED", "SystemExit: the handler called sys.exit(3)"
    ),
    "sys.exit() in a thread": (
        "bad.exit_sync", {}, {}, "FAILED", "SystemExit: the handler called sys.exit(4)"
    ),
    "KeyboardInterrupt": ("bad.interrupt", {}, {}, "FAILED", "KeyboardInterrupt:"),
    "sync, blocking past its lease": ("bad.block", {"seconds": 3 * LEASE}, {}, "SUCCEEDED", ""),
    "sync, blocking past its timeout": (
        "bad.block", {"seconds": 8}, {"timeout": 1}, "FAILED",
        "TimeoutError: the handler exceeded its timeout of 1s",
    ),
    "a 2 MiB result": ("bad.huge", {}, {}, "FAILED", "InvalidResult:"),
    "swallows its cancellation": (
        "bad.swallow", {"seconds": 8}, {"timeout": 1}, "FAILED",
        "TimeoutError: the handler exceeded its timeout of 1s",
    ),
}  # fmt: skip


async def test_misbehaving_handlers_are_contained(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    env = {
        "PYTHONPATH": str(ROOT),
        "TASKQ_LEASE_SECONDS": f"{LEASE:g}",
        "TASKQ_SWEEPER_OVERDUE_AFTER": "1",
        "TASKQ_SWEEPER_CHECK_EVERY": "0.5",
    }
    async with harness(settings) as h, processes(settings, tmp_path) as procs:
        module = "tests.support.misbehaving"
        workers = [await procs.start("worker", module, **env) for _ in range(2)]
        await worker_ready(h, 2)
        client = await Client.connect(settings)
        kinds: dict[uuid.UUID, str] = {}
        try:
            # The misbehaving tasks first, so that they hold slots while the normal ones run.
            for kind, (task_type, payload, options, _, _) in KINDS.items():
                item = {"type": task_type, "payload": payload, **options}
                for result in await client.enqueue_many([item] * EACH):
                    kinds[uuid.UUID(str(result.id))] = kind
            started = time.monotonic()
            normal: list[uuid.UUID] = []
            for _ in range(0, NORMAL, 500):
                answers = await client.enqueue_many([{"type": "ok.noop", "payload": {}}] * 500)
                normal += [uuid.UUID(str(r.id)) for r in answers]
        finally:
            await client.close()
        await all_terminal(db, normal, timeout=120)
        normal_seconds = time.monotonic() - started
        await all_terminal(db, list(kinds), timeout=120)
        every = time.monotonic() - started

        rows = await db.fetch(
            "SELECT id, status, attempts, last_error FROM tasks WHERE id = ANY($1::uuid[])",
            list(kinds),
        )
        wrong = []
        for row in rows:
            _, _, _, status, reason = KINDS[kinds[row["id"]]]
            error = row["last_error"] or ""
            if row["status"] != status or not error.startswith(reason) or row["attempts"] != 1:
                wrong.append((kinds[row["id"]], row["status"], row["attempts"], error[:120]))
        assert not wrong, f"tasks that did not end as their kind should: {wrong}"
        once = await db.fetchval(
            "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[])"
            " AND status = 'SUCCEEDED' AND attempts = 1",
            normal,
        )
        assert once == NORMAL, f"{NORMAL - once} normal tasks did not succeed at their first try"
        alive = [w.returncode is None for w in workers]
        assert all(alive), f"a worker process died: {[w.returncode for w in workers]}"
        figures: Figures = await audit(
            db,
            normal + list(kinds),
            "9 misbehaving handlers",
            faults=len(kinds),
            extra={
                "kinds": len(KINDS),
                "normal tasks done in": f"{normal_seconds:.1f}s",
                "all done in": f"{every:.1f}s",
                "workers alive": f"{sum(alive)}/2",
            },
        )
        assert figures.lost == 0
