"""OpenTelemetry through the real Postgres and RabbitMQ: an enqueue, its attempts and
their retries form one trace; the traceparent is stored and carried by every envelope."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanKind, StatusCode

from taskq.client import Client
from taskq.fleet.relay import publish_owed
from taskq.handlers import Context, Registry
from taskq.settings import Settings
from taskq.store import NewTask
from taskq.tracing import TRACEPARENT
from tests.support.api_fixtures import assert_problem, drain, put_type, running_api
from tests.support.tracing import named, spans, traceparent_of
from tests.support.worker_fixtures import harness, poll, running_worker

__all__ = ["spans"]  # the fixture

pytestmark = pytest.mark.integration

HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def stored(db: asyncpg.Connection, task_id: Any) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT traceparent FROM taskq.tasks WHERE id = $1", uuid.UUID(str(task_id))
    )
    return value


async def run_in_a_trace(
    settings: Settings, registry: Registry, task_type: str, spans: InMemorySpanExporter, runs: int
) -> tuple[Any, Span]:
    """Enqueue ``task_type`` inside a span ``request``, with a worker running; wait until
    it SUCCEEDED and the spans of its ``runs`` attempts ended. Returns the enqueue's
    answer and the request's span."""
    async with (
        harness(settings) as h,
        running_worker(settings, registry),
        Client.connect(settings) as client,
    ):
        with trace.get_tracer("test").start_as_current_span("request") as request:
            answer = await client.enqueue(task_type, {})
        await h.wait_for(answer.id, "SUCCEEDED", timeout=30)
        await poll(
            lambda: len(named(spans.get_finished_spans(), f"process {task_type}")) == runs,
            f"the spans of {runs} attempts did not end",
        )
    return answer, request


async def test_an_enqueue_a_retried_failure_and_a_success_form_one_trace(
    settings: Settings, spans: InMemorySpanExporter, db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(update={"backoff_strategy": "fixed", "backoff_fixed": 1.0})
    registry = Registry()
    attempts: list[int] = []

    @registry.task("trace.flaky", max_attempts=3)
    async def flaky(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        with trace.get_tracer("handler").start_as_current_span("inside the handler"):
            if ctx.attempt == 1:
                raise ValueError("first attempt fails")
        return {"ok": True}

    answer, request = await run_in_a_trace(settings, registry, "trace.flaky", spans, 2)
    finished = spans.get_finished_spans()
    trace_id = request.get_span_context().trace_id
    assert {span.context.trace_id for span in finished} == {trace_id}

    [send] = named(finished, "send trace.flaky")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id
    assert send.attributes is not None
    assert send.attributes["messaging.message.id"] == str(answer.id)
    assert send.attributes["messaging.destination.name"] == "default"
    assert await stored(db, answer.id) == traceparent_of(send)

    first, second = sorted(
        named(finished, "process trace.flaky"),
        key=lambda span: str((span.attributes or {})["taskq.task.attempt"]),
    )
    for attempt in (first, second):
        assert attempt.kind is SpanKind.CONSUMER
        assert attempt.parent is not None and attempt.parent.span_id == send.context.span_id
        assert attempt.attributes is not None
        assert attempt.attributes["messaging.message.id"] == str(answer.id)
    assert first.status.status_code is StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception", "taskq.retried"]
    retried = first.events[1].attributes
    assert retried is not None and retried["taskq.retry.delay_seconds"] == 1.0
    assert retried["taskq.error"] == "ValueError: first attempt fails"
    assert second.status.status_code is StatusCode.OK
    assert [event.name for event in second.events] == ["taskq.succeeded"]
    # The handler ran with its attempt's span as the current span.
    inner = named(finished, "inside the handler")
    assert sorted(span.parent.span_id for span in inner if span.parent) == sorted(
        [first.context.span_id, second.context.span_id]
    )
    assert attempts == [1, 2]


async def test_a_sync_handler_runs_in_its_attempts_span(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    registry = Registry()

    @registry.task("trace.sync")
    def sync(payload: dict[str, Any], ctx: Context) -> None:
        with trace.get_tracer("handler").start_as_current_span("inside the thread"):
            pass

    await run_in_a_trace(settings, registry, "trace.sync", spans, 1)
    finished = spans.get_finished_spans()
    [attempt] = named(finished, "process trace.sync")
    [inner] = named(finished, "inside the thread")
    assert inner.parent is not None and inner.parent.span_id == attempt.context.span_id


async def test_untraced_tasks_store_null_and_make_no_span(
    settings: Settings, spans: InMemorySpanExporter, db: asyncpg.Connection
) -> None:
    registry = Registry()

    @registry.task("trace.plain")
    async def plain(payload: dict[str, Any], ctx: Context) -> None:
        return None

    async with (
        harness(settings) as h,
        running_worker(settings, registry),
        Client.connect(settings) as client,
    ):
        answer = await client.enqueue("trace.plain", {})  # no current span
        await h.wait_for(answer.id, "SUCCEEDED", timeout=30)
        off = settings.model_copy(update={"otel": "off"})
        async with Client.connect(off) as untraced:
            with trace.get_tracer("test").start_as_current_span("request"):
                ignored = await untraced.enqueue("trace.plain", {})
            await h.wait_for(ignored.id, "SUCCEEDED", timeout=30)
    assert await stored(db, answer.id) is None
    assert await stored(db, ignored.id) is None
    assert [span.name for span in spans.get_finished_spans()] == ["request"]


async def test_the_http_header_is_the_parent_and_a_bad_one_a_400(
    settings: Settings, spans: InMemorySpanExporter, db: asyncpg.Connection
) -> None:
    async with running_api(settings) as api:
        await put_type(api, "trace.http")
        good = await api.post(
            "/enqueue",
            json={"type": "trace.http", "payload": {}},
            headers={TRACEPARENT: HEADER},
        )
        assert good.status_code == 201, good.text
        [send] = spans.get_finished_spans()
        assert f"{send.context.trace_id:032x}" == HEADER[3:35]
        assert send.parent is not None and f"{send.parent.span_id:016x}" == HEADER[36:52]
        assert await stored(db, good.json()["id"]) == traceparent_of(send)

        batch = await api.post(
            "/enqueue/batch",
            json={"tasks": [{"type": "trace.http", "payload": {"n": n}} for n in range(2)]},
            headers={TRACEPARENT: HEADER},
        )
        assert batch.status_code == 201, batch.text
        sends = named(spans.get_finished_spans(), "send trace.http")
        assert len(sends) == 2
        batch_span = sends[1]
        assert batch_span.attributes is not None
        assert batch_span.attributes["messaging.batch.message_count"] == 2
        for task in batch.json()["tasks"]:
            assert await stored(db, task["id"]) == traceparent_of(batch_span)

        before = await db.fetchval("SELECT count(*) FROM taskq.tasks")
        for headers in (
            [(TRACEPARENT, "00-nonsense")],
            [(TRACEPARENT, HEADER.upper())],
            [(TRACEPARENT, HEADER), (TRACEPARENT, HEADER)],  # two of them
        ):
            for path, body in (
                ("/enqueue", {"type": "trace.http", "payload": {}}),
                ("/enqueue/batch", {"tasks": [{"type": "trace.http", "payload": {}}]}),
            ):
                response = await api.post(path, json=body, headers=headers)
                assert_problem(response, 400, TRACEPARENT)
        assert await db.fetchval("SELECT count(*) FROM taskq.tasks") == before


async def test_with_otel_off_the_api_ignores_the_header(
    settings: Settings, db: asyncpg.Connection
) -> None:
    off = settings.model_copy(update={"otel": "off"})
    async with running_api(off) as api:
        await put_type(api, "trace.http")
        for header in (HEADER, "nonsense"):
            response = await api.post(
                "/enqueue",
                json={"type": "trace.http", "payload": {}},
                headers={TRACEPARENT: header},
            )
            assert response.status_code == 201, response.text
            assert await stored(db, response.json()["id"]) is None


async def test_the_outbox_the_relay_and_the_sweepers_recovery_carry_the_traceparent(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    async with harness(settings) as h:
        await h.put_type("trace.carried")
        # The outbox: the envelope published right after the enqueue.
        async with Client.connect(settings) as client:
            with trace.get_tracer("test").start_as_current_span("request"):
                answer = await client.enqueue("trace.carried", {})
            [message] = await drain(settings, "default", expect=1)
        [send] = named(spans.get_finished_spans(), "send trace.carried")
        assert message.headers[TRACEPARENT] == traceparent_of(send)
        assert message.message_id == str(answer.id)

        # The relay: a row committed and never published.
        task_id = uuid.uuid4()
        await h.store.enqueue([NewTask(task_id, "trace.carried", "{}", traceparent=HEADER)])
        # (The outbox's row may be owed still: its published marker comes a second later.)
        owed_rows = [row for row in await h.store.publish_owed(0.0, 10) if row.id == task_id]
        assert (await publish_owed(h.store, h.publisher, owed_rows)).confirmed == 1
        [message] = await drain(settings, "default", expect=1)
        assert message.message_id == str(task_id) and message.headers[TRACEPARENT] == HEADER

        # The sweeper: a claim whose lease expired is taken back and published again.
        [claimed] = await h.store.claim([task_id], "gone-worker", 0.01)
        assert claimed.traceparent == HEADER
        await asyncio.sleep(0.05)
        [owed] = await h.store.recover_expired(10)
        assert owed.id == task_id and owed.traceparent == HEADER
        assert (await publish_owed(h.store, h.publisher, [owed])).confirmed == 1
        [message] = await drain(settings, "default", expect=1)
        assert message.message_id == str(task_id) and message.headers[TRACEPARENT] == HEADER

        # A lost envelope marked owed again (the sweeper's republish), then the relay.
        assert await h.store.republish([task_id]) == 1
        [owed] = await h.store.owed_among([task_id])
        assert owed.traceparent == HEADER
