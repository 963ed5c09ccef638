"""The domain's words and records: pure, no services."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from taskq.model import (
    COLUMNS,
    STATUS_NAMES,
    ClaimDecision,
    ClaimedTask,
    EnqueueOutcome,
    OutcomeKind,
    OwedPublish,
    Progress,
    RequestOutcome,
    StatusCounts,
    StopReason,
    TaskRecord,
    TaskStatus,
    Unclaimed,
    claim_from_row,
)

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
TASK = uuid.UUID("01890000-0000-7000-8000-000000000001")
WORKFLOW = uuid.UUID("01890000-0000-7000-8000-0000000000f1")
TOKEN = uuid.UUID("01890000-0000-7000-8000-0000000000ff")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def claim_row(decision: str | None, **values: object) -> tuple[object, ...]:
    """A row of the ``claim`` statement, its columns in order (None where not given)."""
    row = dict.fromkeys(COLUMNS["claim"])
    row.update(id=TASK, decision=decision, **values)
    return tuple(row.values())


def test_statuses_are_their_column_text_and_know_which_are_terminal() -> None:
    assert STATUS_NAMES == ("ENQUEUED", "WAITING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
    assert [s for s in TaskStatus if s.terminal] == [
        TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED,
    ]  # fmt: skip
    assert TaskStatus.FAILED == "FAILED" and f"{TaskStatus.FAILED}" == "FAILED"
    # As a JSON value it is its text (orjson takes no enum as an object key: see
    # StatusCounts).
    assert orjson.loads(orjson.dumps({"status": TaskStatus.RUNNING})) == {"status": "RUNNING"}


def test_a_claimed_row_becomes_the_attempt_to_run() -> None:
    row = claim_row(
        "claimed", type="email.send.v1", queue="high", payload='{"to": "a"}', attempts=2,
        max_attempts=5, timeout_seconds=30.0, run_at=NOW, created_at=NOW, claim_token=TOKEN,
        traceparent=TRACEPARENT,
    )  # fmt: skip
    assert claim_from_row(row) == ClaimedTask(
        TASK, "email.send.v1", "high", '{"to": "a"}', 2, 5, 30.0, NOW, NOW, TOKEN, TRACEPARENT
    )


def test_an_early_row_keeps_its_delay_and_a_missing_one_has_nothing() -> None:
    early = claim_from_row(claim_row("early", type="t", queue="low", attempts=0, delay=12.5))
    assert early == Unclaimed(TASK, ClaimDecision.EARLY, "t", "low", 0, None, None, 12.5)
    assert early.decision is ClaimDecision.EARLY
    missing = claim_from_row(claim_row("missing"))
    assert missing == Unclaimed(TASK, ClaimDecision.MISSING)
    assert missing.delay == 0.0


def test_an_unknown_decision_is_an_error_not_a_silent_drop() -> None:
    with pytest.raises(KeyError):
        claim_from_row(claim_row("postponed"))


def test_an_exhausted_claim_owes_a_dead_letter_with_its_reason() -> None:
    row = claim_row(
        "exhausted", type="t", queue="default", attempts=3, last_error="boom", generation=4,
        traceparent=TRACEPARENT,
    )  # fmt: skip
    exhausted = claim_from_row(row)
    assert isinstance(exhausted, Unclaimed)
    assert exhausted.dead_letter() == OwedPublish(
        TASK, "t", "default", TaskStatus.FAILED, 3, "boom", 4, 0.0, TRACEPARENT
    )


def test_an_owed_publish_reads_its_columns_in_order_and_types_its_status() -> None:
    owed = OwedPublish.from_row((TASK, "t", "default", "ENQUEUED", 1, None, 7, 2.5, None))
    assert owed == OwedPublish(TASK, "t", "default", TaskStatus.ENQUEUED, 1, None, 7, 2.5)
    assert owed.status is TaskStatus.ENQUEUED
    traced = OwedPublish.from_row((TASK, "t", "q", "FAILED", 1, "boom", 7, 0.0, TRACEPARENT))
    assert traced.traceparent == TRACEPARENT
    with pytest.raises(KeyError):
        OwedPublish.from_row((TASK, "t", "default", "LOST", 1, None, 7, 2.5, None))


def test_hot_path_records_are_immutable_and_carry_no_dict() -> None:
    owed = OwedPublish(TASK, "t", "default", TaskStatus.ENQUEUED, 1, None, 7, 2.5)
    with pytest.raises(AttributeError):
        owed.delay = 0.0  # type: ignore[misc]
    assert not hasattr(owed, "__dict__")


def test_refused_enqueue_outcomes() -> None:
    assert {o for o in EnqueueOutcome if o.refused} == {
        EnqueueOutcome.CONFLICT, EnqueueOutcome.UNKNOWN_TYPE,
    }  # fmt: skip


def test_a_request_outcome_names_each_store_outcome_a_request_can_end_with() -> None:
    # What the store did keeps its name; an unknown type is refused before, as invalid.
    named = {o.value for o in EnqueueOutcome} - {EnqueueOutcome.UNKNOWN_TYPE}
    assert {o.value for o in RequestOutcome} == named | {"invalid"}


def test_every_outcome_has_its_metric_label_and_every_stop_its_words() -> None:
    assert [k.label for k in OutcomeKind] == [
        "succeeded", "retried", "failed", "given_back", "cancelled",
    ]  # fmt: skip
    assert StopReason.TIMEOUT.after == "its timeout"
    assert all(reason.after for reason in StopReason)


def test_status_counts_fill_every_status_and_serialise() -> None:
    rows = [  # as stats_counts groups them: (status), (queue, status), (type, status)
        {"status": "ENQUEUED", "n": 5, "queue": None, "type": None, "no_queue": 1, "no_type": 1},
        {"status": "ENQUEUED", "n": 5, "queue": "high", "type": None, "no_queue": 0, "no_type": 1},
        {"status": "FAILED", "n": 2, "queue": None, "type": "t", "no_queue": 1, "no_type": 0},
    ]
    counts = StatusCounts.from_rows(rows)
    zero = dict.fromkeys(STATUS_NAMES, 0)
    assert counts.by_status == {**zero, "ENQUEUED": 5}
    assert counts.by_queue == {"high": {**zero, "ENQUEUED": 5}}
    assert counts.by_type == {"t": {**zero, "FAILED": 2}}
    assert orjson.loads(orjson.dumps(counts.by_queue)) == counts.by_queue


def test_a_task_reads_why_its_publish_was_set_aside_only_from_its_detail_row() -> None:
    row = {
        "id": TASK, "type": "t", "queue": "default", "payload": "{}", "status": "FAILED",
        "attempts": 1, "max_attempts": 1, "idempotency_key": None, "result": None,
        "last_error": "boom", "timeout_seconds": 30.0, "run_at": NOW, "lease_expires_at": None,
        "worker_id": None, "published_at": None, "created_at": NOW, "updated_at": NOW,
        "started_at": NOW, "finished_at": NOW, "cancel_requested_at": None, "replays": 0,
        "scheduled": False, "wait_reason": None, "publish_error": "Unpublishable: gone",
        "publish_retry_at": NOW,
        "progress": None, "progress_details": None, "progress_attempt": None, "progress_at": None,
        "limited_by": "stripe", "limited_until": NOW, "workflow_id": WORKFLOW,
    }  # fmt: skip
    listed = TaskRecord.from_row(row)
    assert (listed.status, listed.publish_error) == (TaskStatus.FAILED, None)
    assert (listed.limited_by, listed.limited_until) == (None, None)
    detail = TaskRecord.from_detail_row(row)
    assert (detail.publish_error, detail.publish_retry_at) == ("Unpublishable: gone", NOW)
    assert (detail.limited_by, detail.limited_until) == ("stripe", NOW)
    assert (listed.workflow_id, detail.workflow_id) == (None, WORKFLOW)
    assert detail.progress is None


def test_a_task_reads_its_progress_from_its_detail_row_only() -> None:
    row = {
        "id": TASK, "type": "t", "queue": "default", "payload": "{}", "status": "SUCCEEDED",
        "attempts": 1, "max_attempts": 1, "idempotency_key": None, "result": '{"n": 1}',
        "last_error": None, "timeout_seconds": 30.0, "run_at": NOW, "lease_expires_at": None,
        "worker_id": None, "published_at": None, "created_at": NOW, "updated_at": NOW,
        "started_at": NOW, "finished_at": NOW, "cancel_requested_at": None, "replays": 0,
        "scheduled": False, "wait_reason": None, "publish_error": None, "publish_retry_at": None,
        "limited_by": None, "limited_until": None, "workflow_id": None,
        "progress": 0.5, "progress_details": '{"rows": 4}', "progress_attempt": 1,
        "progress_at": NOW,
    }  # fmt: skip
    assert TaskRecord.from_row(row).progress is None
    detail = TaskRecord.from_detail_row(row)
    assert detail.progress == Progress(0.5, '{"rows": 4}', 1, NOW)
    assert detail.result_value() == {"n": 1}
