"""OpenTelemetry's SDK for the tracing tests: spans go to an in-memory exporter.

OpenTelemetry takes one global tracer provider per process, so the first test
that asks sets it, and every test empties the exporter before it starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_EXPORTER: InMemorySpanExporter | None = None


def exporter() -> InMemorySpanExporter:
    """The process's in-memory exporter, set up behind the global tracer provider once."""
    global _EXPORTER
    if _EXPORTER is None:
        _EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return _EXPORTER


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The exporter, empty at the start of the test."""
    found = exporter()
    found.clear()
    yield found
    found.clear()


def traceparent_of(span: ReadableSpan) -> str:
    """The W3C traceparent naming ``span``."""
    context = span.get_span_context()
    assert context is not None
    flags = int(context.trace_flags)
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"


def named(finished: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]
