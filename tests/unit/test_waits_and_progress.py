"""The pure parts of waiting and progress: checking a wait's arguments, what a wait's end
answers, checking a progress report, and the buffer that keeps the latest report."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from taskq.errors import InvalidRequest, TaskCancelled, TaskFailed, WaitTimeout
from taskq.handlers import MAX_PROGRESS_DETAILS_BYTES, Context, check_progress
from taskq.model import TaskRecord, TaskStatus
from taskq.waiting import check_wait, outcome
from taskq.worker.progress import ProgressBuffer

TASK = uuid.UUID("01900000-0000-7000-8000-000000000001")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(status: TaskStatus, last_error: str | None = None) -> TaskRecord:
    return TaskRecord(
        TASK, "t", "default", "{}", status, 1, 1, None, '"ok"', last_error, 30.0, NOW, None,
        None, None, NOW, NOW, NOW, NOW, None, 0, False,
    )  # fmt: skip


def test_a_wait_takes_a_task_id_and_a_timeout() -> None:
    assert check_wait(TASK, 5) == (TASK, 5.0)
    assert check_wait(str(TASK), 0.5) == (TASK, 0.5)


@pytest.mark.parametrize(
    ("task_id", "timeout", "fields"),
    [
        ("nope", 1, ["task_id"]),
        (42, 1, ["task_id"]),
        (TASK, -1, ["timeout"]),
        (TASK, math.nan, ["timeout"]),
        (TASK, math.inf, ["timeout"]),
        (TASK, True, ["timeout"]),
        (TASK, "5", ["timeout"]),
        (None, None, ["task_id", "timeout"]),
    ],
)
def test_a_bad_wait_names_its_fields(task_id: Any, timeout: Any, fields: list[str]) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_wait(task_id, timeout)
    assert [e.field for e in raised.value.errors] == fields


def test_a_wait_answers_by_how_the_task_ended() -> None:
    succeeded = record(TaskStatus.SUCCEEDED)
    assert outcome(succeeded, 1.0) is succeeded
    with pytest.raises(TaskFailed) as failed:
        outcome(record(TaskStatus.FAILED, "Fail: bad input"), 1.0)
    assert (failed.value.reason, failed.value.task.status) == ("Fail: bad input", "FAILED")
    with pytest.raises(TaskCancelled) as cancelled:
        outcome(record(TaskStatus.CANCELLED), 1.0, cancel_reason="not needed")
    assert cancelled.value.reason == "not needed"
    with pytest.raises(TaskCancelled, match="cancelled"):
        outcome(record(TaskStatus.CANCELLED), 1.0)
    for status in (TaskStatus.ENQUEUED, TaskStatus.RUNNING):
        with pytest.raises(WaitTimeout) as timed_out:
            outcome(record(status), 2.5)
        assert (timed_out.value.task.status, timed_out.value.timeout) == (status, 2.5)
        assert "after 2.5s" in str(timed_out.value)


def test_a_result_is_parsed_from_its_json() -> None:
    assert record(TaskStatus.SUCCEEDED).result_value() == "ok"
    assert replace(record(TaskStatus.SUCCEEDED), result=None).result_value() is None


def test_progress_takes_a_fraction_and_a_small_json_object() -> None:
    assert check_progress(0, None) is None
    assert check_progress(1, {"rows": 4000, "stage": "load"}) == '{"rows":4000,"stage":"load"}'
    assert check_progress(0.5, {}) == "{}"


@pytest.mark.parametrize(
    ("fraction", "details", "fields"),
    [
        (-0.1, None, ["fraction"]),
        (1.01, None, ["fraction"]),
        (math.nan, None, ["fraction"]),
        (True, None, ["fraction"]),
        ("0.5", None, ["fraction"]),
        (0.5, [1, 2], ["details"]),
        (0.5, {"f": object()}, ["details"]),
        (0.5, {"big": "x" * MAX_PROGRESS_DETAILS_BYTES}, ["details"]),
        (0.5, {"nul": "a\x00b"}, ["details"]),
        (2, "x", ["fraction", "details"]),
    ],
)
def test_a_bad_progress_report_names_its_fields(
    fraction: Any, details: Any, fields: list[str]
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_progress(fraction, details)
    assert [e.field for e in raised.value.errors] == fields


def context(reports: list[tuple[float, str | None]]) -> Context:
    return Context(TASK, "t", 1, 1, "default", "w", _report=lambda *report: reports.append(report))


async def test_a_context_reports_progress_awaited_or_not() -> None:
    reports: list[tuple[float, str | None]] = []
    ctx = context(reports)
    await ctx.progress(0.25)
    ctx.progress(1, {"rows": 2})  # a sync handler's call: nothing to await
    await asyncio.to_thread(ctx.progress, 0.75)  # from another thread
    assert reports == [(0.25, None), (1.0, '{"rows":2}'), (0.75, None)]
    with pytest.raises(InvalidRequest):
        ctx.progress(3)
    assert len(reports) == 3
    ctx.request_cancel()  # the worker stopped waiting: later reports are dropped
    await ctx.progress(0.9)
    assert len(reports) == 3
    # Without a worker (taskq.testing), a report is checked and dropped.
    await Context(TASK, "t", 1, 1, "default", "w").progress(0.5)


def test_the_buffer_keeps_the_latest_report_of_each_task() -> None:
    buffer = ProgressBuffer()
    other = uuid.uuid4()
    for n in range(1000):
        buffer.report(TASK, 1, n / 1000, None)
    buffer.report(other, 2, 1.0, "{}")
    assert sorted(buffer.take(), key=lambda r: r[2]) == [
        (TASK, 1, 0.999, None),
        (other, 2, 1.0, "{}"),
    ]
    assert buffer.take() == []


def test_the_buffer_takes_reports_from_many_threads() -> None:
    buffer = ProgressBuffer()
    ids = [uuid.uuid4() for _ in range(8)]

    def report(task_id: uuid.UUID) -> None:
        for n in range(500):
            buffer.report(task_id, 1, n / 499, None)

    threads = [threading.Thread(target=report, args=(task_id,)) for task_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(buffer.take()) == sorted((task_id, 1, 1.0, None) for task_id in ids)
