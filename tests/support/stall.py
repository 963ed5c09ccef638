"""What a stalled test was waiting for: the event loop's tasks and the database's sessions.

:func:`stall_report` is written to stderr (pytest shows it with the failure) when a
test helper's wait times out or a worker takes long to stop, so that an
intermittent hang explains itself the first time it happens.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys

import asyncpg

# Frames of these files are the ones worth reading in a task's stack.
_OURS = (os.sep + "taskq" + os.sep, os.sep + "tests" + os.sep)
_SERVER_URL = os.environ.get(
    "TASKQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def task_stacks() -> str:
    """Every pending task of the running loop: its name and where it waits (the
    frames of taskq and the tests; the innermost other frame too)."""
    out = io.StringIO()
    current = asyncio.current_task()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is current:
            continue
        frames = task.get_stack()
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", repr(coro))
        out.write(f"- {task.get_name()} ({name})\n")
        for i, frame in enumerate(frames):
            path = frame.f_code.co_filename
            if any(part in path for part in _OURS) or i == len(frames) - 1:
                where = path.rsplit(os.sep, 2)[-2:]
                out.write(f"    {'/'.join(where)}:{frame.f_lineno} in {frame.f_code.co_name}\n")
    return out.getvalue()


async def database_report(database_url: str | None = None) -> str:
    """The sessions of ``database_url``'s database (all databases if None) that are in a
    transaction or waiting, with the locks they wait for and who blocks them."""
    try:
        connection = await asyncpg.connect(_SERVER_URL, timeout=5)
    except Exception as exc:  # a report must never hide the failure it explains
        return f"(no database report: {exc})\n"
    try:
        database = None
        if database_url is not None:
            database = database_url.rsplit("/", 1)[-1].split("?", 1)[0]
        rows = await connection.fetch(
            "SELECT pid, datname, application_name, state, wait_event_type, wait_event,"
            " now() - xact_start AS xact_age, now() - state_change AS state_age,"
            " pg_blocking_pids(pid) AS blocked_by, left(query, 300) AS query"
            " FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            " AND ($1::text IS NULL OR datname = $1)"
            " AND (xact_start IS NOT NULL OR wait_event_type = 'Lock')"
            " ORDER BY xact_start NULLS LAST",
            database,
            timeout=5,
        )
    except Exception as exc:
        return f"(no database report: {exc})\n"
    finally:
        await connection.close()
    out = io.StringIO()
    for row in rows:
        out.write(
            f"- pid {row['pid']} {row['datname']} {row['application_name']!r}"
            f" {row['state']} wait={row['wait_event_type']}/{row['wait_event']}"
            f" xact_age={row['xact_age']} state_age={row['state_age']}"
            f" blocked_by={list(row['blocked_by'])}\n    {row['query']!r}\n"
        )
    return out.getvalue() or "(no session in a transaction)\n"


async def stall_report(title: str, database_url: str | None = None) -> str:
    """The tasks and the database sessions, under ``title``, also written to stderr."""
    report = (
        f"\n===== stall: {title}\n--- asyncio tasks\n{task_stacks()}"
        f"--- database sessions in a transaction or waiting\n"
        f"{await database_report(database_url)}=====\n"
    )
    sys.stderr.write(report)
    return report


def watchdog(seconds: float, title: str, database_url: str | None = None) -> asyncio.TimerHandle:
    """Report the stall if the test still runs in ``seconds`` (cancel the handle when it
    ends): set a little before pytest-timeout's, whose failure says only that the loop
    was waiting, not for what."""
    loop = asyncio.get_running_loop()
    reports: set[asyncio.Task[str]] = set()

    def fire() -> None:
        task = loop.create_task(
            stall_report(f"{title} still running after {seconds:g}s", database_url)
        )
        reports.add(task)
        task.add_done_callback(reports.discard)

    return loop.call_later(seconds, fire)
