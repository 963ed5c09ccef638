"""taskq.tracing without services: traceparent checks, spans into the SDK's in-memory
exporter, envelope headers, and no opentelemetry import for untraced work."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskq import tracing
from taskq.errors import InvalidRequest
from taskq.fleet.relay import _publish
from taskq.model import ClaimedTask, OutcomeKind, OwedPublish, TaskStatus
from taskq.settings import load_settings
from taskq.tracing import TRACEPARENT, Tracing, check_traceparent
from tests.support.tracing import spans, traceparent_of

__all__ = ["spans"]  # the fixture

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TASK = uuid.UUID("0190d6a0-0000-7000-8000-000000000001")


@pytest.mark.parametrize(
    "value",
    [
        VALID,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",  # not sampled
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",  # a later version
    ],
)
def test_a_w3c_traceparent_is_taken_as_it_is(value: str) -> None:
    assert check_traceparent(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # the invalid version
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # no trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # no parent id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-001",
        "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0\n",
    ],
)
def test_anything_else_is_refused_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_traceparent(value)
    [error] = caught.value.errors
    assert error.field == "traceparent"
    assert "W3C traceparent" in error.message


def test_envelopes_carry_the_traceparent_only_for_traced_tasks() -> None:
    untraced = OwedPublish(TASK, "t", "default", TaskStatus.ENQUEUED, 1, None, 2, 5.0)
    assert _publish(untraced, None).headers is None
    traced = untraced._replace(traceparent=VALID)
    assert _publish(traced, None).headers == {TRACEPARENT: VALID}
    assert _publish(traced, None).delay == 5.0
    failed = traced._replace(status=TaskStatus.FAILED, last_error="ValueError: boom")
    headers = _publish(failed, None).headers
    assert headers is not None
    assert headers[TRACEPARENT] == VALID and headers["x-taskq-reason"] == "ValueError: boom"
    assert TRACEPARENT not in (_publish(failed._replace(traceparent=None), None).headers or {})


def test_off_means_no_tracing_and_a_missing_extra_means_no_tracer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Tracing.load(load_settings(_env_file=None, otel="off")) is None
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails: extra missing
    loaded = Tracing.load(load_settings(_env_file=None))
    assert loaded is not None and loaded.tracer is None
    # Without the extra, a header's traceparent is still kept (text), with no span.
    sending = loaded.sending(VALID)
    assert sending is not None and sending.span is None and sending.traceparent == VALID
    assert loaded.sending(None) is None
    with pytest.raises(InvalidRequest):
        loaded.sending("nonsense")


def test_no_current_span_and_no_header_make_no_span(spans: InMemorySpanExporter) -> None:
    loaded = Tracing.load(load_settings(_env_file=None))
    assert loaded is not None and loaded.sending(None) is None
    assert spans.get_finished_spans() == ()


def test_an_enqueue_in_a_span_is_a_producer_span_whose_context_the_tasks_keep(
    spans: InMemorySpanExporter,
) -> None:
    loaded = Tracing.load(load_settings(_env_file=None))
    assert loaded is not None
    with trace.get_tracer("test").start_as_current_span("request") as request:
        sending = loaded.sending(None)
        assert sending is not None
        with sending:
            sending.enqueued([{"id": TASK, "type": "email.send", "queue": "high"}])
    [send, parent] = spans.get_finished_spans()
    assert parent.name == "request"
    assert send.name == "send email.send" and send.kind is SpanKind.PRODUCER
    assert send.parent is not None
    assert send.parent.span_id == request.get_span_context().span_id
    assert sending.traceparent == traceparent_of(send)
    assert send.attributes is not None
    assert dict(send.attributes) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "high",
        "messaging.message.id": str(TASK),
        "taskq.task.type": "email.send",
    }


def test_a_header_is_the_parent_and_a_failed_enqueue_an_error(
    spans: InMemorySpanExporter,
) -> None:
    loaded = Tracing.load(load_settings(_env_file=None))
    assert loaded is not None
    sending = loaded.sending(VALID)
    assert sending is not None
    with pytest.raises(RuntimeError), sending:
        raise RuntimeError("database down")
    [send] = spans.get_finished_spans()
    assert f"{send.context.trace_id:032x}" == VALID[3:35]
    assert send.parent is not None and f"{send.parent.span_id:016x}" == VALID[36:52]
    assert send.status.status_code is StatusCode.ERROR
    assert [event.name for event in send.events] == ["exception"]


def _claimed(traceparent: str | None) -> ClaimedTask:
    now = datetime.now(UTC)
    return ClaimedTask(TASK, "t", "default", "{}", 2, 3, 10.0, now, now, uuid.uuid4(), traceparent)


def test_an_attempt_is_a_consumer_span_under_the_stored_context_and_ends_with_its_outcome(
    spans: InMemorySpanExporter,
) -> None:
    loaded = Tracing.load(load_settings(_env_file=None))
    assert loaded is not None
    assert loaded.attempt(_claimed(None)) is None
    span = loaded.attempt(_claimed(VALID))
    assert span is not None
    tracing.ended(span, OutcomeKind.RETRY, "ValueError: boom", 30.0, ValueError("boom"))
    [attempt] = spans.get_finished_spans()
    assert attempt.name == "process t" and attempt.kind is SpanKind.CONSUMER
    assert attempt.parent is not None and f"{attempt.parent.span_id:016x}" == VALID[36:52]
    assert attempt.attributes is not None
    assert attempt.attributes["taskq.task.attempt"] == 2
    assert attempt.attributes["taskq.outcome"] == "retried"
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.status.description == "ValueError: boom"
    exception, retried = attempt.events
    assert exception.name == "exception"
    assert retried.name == "taskq.retried" and retried.attributes is not None
    assert dict(retried.attributes) == {
        "taskq.error": "ValueError: boom",
        "taskq.retry.delay_seconds": 30.0,
    }


@pytest.mark.parametrize(
    ("kind", "status", "event"),
    [
        (OutcomeKind.COMPLETE, StatusCode.OK, "taskq.succeeded"),
        (OutcomeKind.FAIL, StatusCode.ERROR, "taskq.failed"),
        (OutcomeKind.GIVE_BACK, StatusCode.UNSET, "taskq.given_back"),
        (OutcomeKind.CANCEL, StatusCode.UNSET, "taskq.cancelled"),
        (None, StatusCode.UNSET, "taskq.lease_lost"),
    ],
)
def test_every_outcome_is_an_event_and_a_status(
    spans: InMemorySpanExporter, kind: OutcomeKind | None, status: StatusCode, event: str
) -> None:
    loaded = Tracing.load(load_settings(_env_file=None))
    assert loaded is not None
    span = loaded.attempt(_claimed(VALID))
    assert span is not None
    tracing.ended(span, kind, "Fail: no" if kind is OutcomeKind.FAIL else None)
    [attempt] = spans.get_finished_spans()
    assert attempt.status.status_code is status
    assert [e.name for e in attempt.events] == [event]


def test_untraced_code_imports_no_opentelemetry() -> None:
    # A fresh interpreter: this one imported the SDK for the tests above.
    code = (
        "import sys, taskq, taskq.client, taskq.web.api, taskq.worker.worker, taskq.tracing\n"
        "from taskq.fleet.relay import _publish\n"
        "found = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not found, found\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class Broken:
    """A tracer, span and processor in one, each call failing: an application's
    OpenTelemetry set-up gone wrong."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"broken {name}")

        return fail


def test_a_failing_opentelemetry_set_up_fails_no_enqueue_and_no_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = Tracing(cast(Any, Broken()))
    with trace.get_tracer("test").start_as_current_span("request"):
        assert broken.sending(None) is None  # not traced, but enqueued
    assert broken.sending(VALID) is None
    assert broken.attempt(_claimed(VALID)) is None
    span = cast(Any, Broken())
    tracing.ended(span, OutcomeKind.COMPLETE)
    sending = tracing.Sending(span, VALID)
    sending.enqueued([{"id": TASK, "type": "t", "queue": "default"}])
    with sending:
        pass
    failures = [r for r in caplog.records if r.name == "taskq.tracing"]
    assert len(failures) == 6 and all("going on without it" in r.message for r in failures)
