"""Load held (issue 6, scenario 8): 100 concurrent enqueue clients for 30 s while a worker runs.

Every request must be answered 201, and every task accepted must end
SUCCEEDED once, as in the other fault scenarios. The rate and the latency
percentiles are printed (run with ``-s``); they depend on the machine and on
whatever else runs on it, so only correctness is asserted, not speed. The
clients run in the test process on the same machine, so they take CPU from
the API they measure.

Each client sends its next request ``PAUSE`` after the previous answer: 100
clients offer at most 400 enqueues/s, about what one worker runs on a busy
2-core machine while the API takes its share. Back to back, the API accepts
~850/s there, and the worker would need minutes after the 30 s to run the
backlog the audit waits for.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology
from tests.support.fault_load import Load, api_process, committed, consumers, put_record_type
from tests.support.faults import all_terminal, audit, eventually, processes

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(300)]

CLIENTS = 100
SECONDS = 30.0
PAUSE = 0.25


async def test_load_held_answers_every_request(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """100 clients enqueue back to back for 30 s through ``taskq api``; one worker runs them."""
    await declare_topology(settings)
    await put_record_type(settings.database_url)
    async with processes(settings, tmp_path) as procs, api_process(procs) as http:
        worker = await procs.worker("--concurrency", "64")

        async def consuming() -> bool:
            return await consumers(settings) == 1

        await eventually(consuming, 30, "the worker consuming")
        load = Load(http.base_url.port or 0, clients=CLIENTS, pause=PAUSE)
        started = time.monotonic()
        load.start()
        await asyncio.sleep(SECONDS)
        await load.finish()
        elapsed = time.monotonic() - started
        ids = await committed(settings.database_url, load.marker)
        await all_terminal(db, ids, timeout=120)
        drained = time.monotonic() - started - elapsed
        errors = len(load.answers) - len(load.accepted)
        extra = {
            "clients": CLIENTS,
            "pause (s)": PAUSE,
            "seconds": round(elapsed, 1),
            "requests": len(load.answers),
            "errors": errors,
            "rate (enqueues/s)": round(len(load.accepted) / elapsed),
            "p50 (ms)": round(load.percentile(50) * 1000, 1),
            "p99 (ms)": round(load.percentile(99) * 1000, 1),
            "max (ms)": round(load.percentile(100) * 1000, 1),
            "backlog drained after the load (s)": round(drained, 1),
        }
        figures = await audit(db, ids, "8 load held", faults=0, extra=extra)
        await procs.stop(worker)
    assert load.statuses() == {"201": len(load.accepted)}, load.statuses()
    assert sorted(load.accepted) == sorted(ids), "201s and rows differ"
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert figures.executions == len(ids)
