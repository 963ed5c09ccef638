"""The promises while RabbitMQ or Postgres restarts under load (issue 6, scenarios 2 and 3).

A ``taskq api`` process and two ``taskq worker`` processes run while HTTP
clients keep enqueueing; then the broker or the database goes away and comes
back. Nothing is restarted by the test but the server: the API and the
workers must reconnect by themselves.

The servers restarted here are **private**: a RabbitMQ node and a Postgres
cluster that :mod:`tests.support.private_services` starts for this session from the
machine's installed binaries, on free ports, in a temporary directory. They
are the real RabbitMQ and Postgres, only disposable; the machine's shared
servers (5672, 5432), which other test runs use at the same time, are never
touched. Scenario 3 keeps its envelopes on the shared broker (in a namespace
of its own) since only Postgres restarts there.

Each scenario ends with the audit of :mod:`tests.support.faults` and prints its
figures (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.support.api_fixtures import declare_topology
from tests.support.fault_load import (
    Load,
    api_process,
    committed,
    consumers,
    health,
    migrated_database,
    progress,
    put_record_type,
)
from tests.support.faults import all_terminal, audit, eventually, processes
from tests.support.private_services import (
    PrivatePostgres,
    PrivateRabbit,
    private_postgres,
    private_rabbit,
)
from tests.support.services import delete_namespace, make_settings

__all__ = ["private_postgres", "private_rabbit"]  # fixtures, used by name

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(300)]

# Failed attempts (the database went away mid-handler) come back after 1 s, not 5 s.
RETRY_FAST = {"TASKQ_BACKOFF_STRATEGY": "fixed", "TASKQ_BACKOFF_FIXED": "1"}
# The API's database pool gives up connecting after 5 s and a statement after
# 10 s (taskq.store); an answer while Postgres is down may take that long, no more.
DATABASE_TIMEOUT = 10.0
BOUNDED = DATABASE_TIMEOUT + 5.0


def reconnects_logged(logs: Path) -> dict[str, int]:
    """How often each process's log says one of its broker links reconnected."""
    return {
        path.stem: path.read_text().count("reconnected to the broker")
        for path in logs.glob("*.log")
    }


# ---------------------------------------------------------------------- scenario 2


async def test_broker_restarts_under_load_lose_nothing(
    private_rabbit: PrivateRabbit, database_url: str, namespace: str, tmp_path: Path
) -> None:
    """``rabbitmqctl stop_app``/``start_app``, then a full node stop and start, under load.

    During each outage the API still answers 201 (the task is in Postgres; its
    publish is owed to the outbox and the relay) and /healthz says degraded;
    afterwards the API and both workers carry on on their own.
    """
    settings = make_settings(
        database_url=database_url, amqp_url=private_rabbit.url, namespace=namespace, max_delay="1h"
    )
    await declare_topology(settings)
    await put_record_type(database_url)
    outages: list[tuple[str, float, float, list[str]]] = []
    async with processes(settings, tmp_path) as procs, api_process(procs) as http:
        api = procs.started[0]
        workers = [await procs.worker(**RETRY_FAST), await procs.worker(**RETRY_FAST)]

        async def both_consuming() -> bool:
            return await consumers(settings) == 2

        await eventually(both_consuming, 30, "2 workers consuming")
        load = Load(http.base_url.port or 0)
        load.start()
        await progress(database_url, load.marker, "tasks running before the faults")

        async def outage(name: str, down: Callable[[], None], up: Callable[[], None]) -> None:
            start = time.monotonic()
            await asyncio.to_thread(down)
            seen: list[str] = []

            async def degraded() -> bool:
                code, body = await health(http)
                seen.append(f"{code} {body.get('status')}")
                return code == 200 and body.get("status") == "degraded"

            await eventually(degraded, 15, f"/healthz degraded after {name}", every=0.3)
            await asyncio.sleep(2.0)  # enqueues go on while the broker is away
            await asyncio.to_thread(up)
            outages.append((name, start, time.monotonic(), seen))
            await progress(database_url, load.marker, f"tasks running again after {name}", 90)

            async def both_back() -> bool:
                return await consumers(settings) == 2

            await eventually(both_back, 60, f"both workers consuming again after {name}")

        await outage("stop_app", private_rabbit.stop_app, private_rabbit.start_app)
        await outage("node stop", private_rabbit.stop, private_rabbit.start)
        await asyncio.sleep(2.0)
        await load.finish()

        async def healthy() -> bool:
            code, body = await health(http)
            return code == 200 and body.get("status") == "ok"

        await eventually(healthy, 30, "/healthz ok again")
        ids = await committed(database_url, load.marker)
        db = await asyncpg.connect(database_url)
        try:
            await all_terminal(db, ids, timeout=120)
            during = [load.during(start, end) for _, start, end, _ in outages]
            extra = {
                "answered 201": len(load.accepted),
                "201 during the outages": sum(
                    1 for answers in during for a in answers if a[2] == 201
                ),
                "outages (s)": [round(end - start, 1) for _, start, end, _ in outages],
                "answers": load.statuses(),
            }
            figures = await audit(db, ids, "2 broker restarts", faults=len(outages), extra=extra)
        finally:
            await db.close()
        alive = [p.returncode is None for p in (api, *workers)]
        for worker in workers:
            await procs.stop(worker)
    assert alive == [True, True, True], "a process died instead of reconnecting"
    reconnects = reconnects_logged(tmp_path)
    print(f"[fault] 2 broker restarts: reconnects logged per process = {reconnects}")
    assert len(reconnects) == 3 and min(reconnects.values()) >= len(outages), reconnects
    assert load.statuses() == {"201": len(load.accepted)}, load.statuses()
    assert set(load.accepted) <= set(ids), "a 201 was answered for a task not in Postgres"
    for (name, _, _, _), answers in zip(outages, during, strict=True):
        assert any(a[2] == 201 for a in answers), f"no task accepted during the {name} outage"
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert figures.executions >= len(ids)


# ---------------------------------------------------------------------- scenario 3


async def test_postgres_restarts_under_load_lose_nothing(
    private_postgres: PrivatePostgres, amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """Postgres stopped (``fast``, then ``immediate`` as a crash) and started under load.

    While it is down every request is answered 503 problem+json within the
    database timeouts (never a 500, never a hang); the workers back off and
    carry on once it is back; nothing accepted is lost or left RUNNING.
    """
    database_url = await migrated_database(private_postgres.server_url)
    settings = make_settings(
        database_url=database_url, amqp_url=amqp_url, namespace=namespace, max_delay="1h"
    )
    try:
        await declare_topology(settings)
        await put_record_type(database_url)
        outages: list[tuple[str, float, float, list[int]]] = []
        async with processes(settings, tmp_path) as procs, api_process(procs) as http:
            api = procs.started[0]
            workers = [await procs.worker(**RETRY_FAST), await procs.worker(**RETRY_FAST)]

            async def both_consuming() -> bool:
                return await consumers(settings) == 2

            await eventually(both_consuming, 30, "2 workers consuming")
            load = Load(http.base_url.port or 0)
            load.start()
            await progress(database_url, load.marker, "tasks running before the faults")
            for mode in ("fast", "immediate"):
                start = time.monotonic()
                await asyncio.to_thread(private_postgres.stop, mode)
                await asyncio.sleep(4.0)  # requests keep coming while it is down
                healthz = [(await health(http))[0] for _ in range(3)]
                await asyncio.to_thread(private_postgres.start)
                outages.append((mode, start, time.monotonic(), healthz))
                await progress(database_url, load.marker, f"tasks running after a {mode} stop", 90)
            await asyncio.sleep(2.0)
            await load.finish()
            ids = await committed(database_url, load.marker)
            db = await asyncpg.connect(database_url)
            try:
                await all_terminal(db, ids, timeout=120)
                during = [a for _, start, end, _ in outages for a in load.during(start, end)]
                slowest = max(a[1] for a in during)
                extra = {
                    "answered 201": len(load.accepted),
                    "answered 503 while down": sum(1 for a in during if a[2] == 503),
                    "slowest answer while down (s)": round(slowest, 2),
                    "answers": load.statuses(),
                }
                figures = await audit(
                    db, ids, "3 Postgres restarts", faults=len(outages), extra=extra
                )
            finally:
                await db.close()
            alive = [p.returncode is None for p in (api, *workers)]
            for worker in workers:
                await procs.stop(worker)
    finally:
        await delete_namespace(settings)
    assert alive == [True, True, True], "a process died instead of reconnecting"
    statuses = load.statuses()
    assert set(statuses) <= {"201", "503"}, f"answers other than 201 and 503: {statuses}"
    assert any(a[2] == 503 for a in during), "no request met the outage"
    for _, took, status, content_type in load.answers:
        if status == 503:
            assert content_type.startswith("application/problem+json"), content_type
        assert took < BOUNDED, f"an answer took {took:.1f}s (bound {BOUNDED:g}s)"
    for mode, _, _, healthz in outages:
        assert healthz == [503, 503, 503], f"/healthz while Postgres was down ({mode}): {healthz}"
    assert set(load.accepted) <= set(ids), "a 201 was answered for a task not in Postgres"
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert figures.executions >= len(ids)
