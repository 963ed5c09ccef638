"""OpenTelemetry tracing, when the ``taskq[otel]`` extra is installed (docs/operations.md).

A task enqueued inside a trace keeps the enqueuer's W3C ``traceparent`` (the
``traceparent`` column, and the ``traceparent`` header of every envelope
published for it); the enqueue is a PRODUCER span, each attempt a CONSUMER span
that is a child of it (retries included, so they land in the same trace), and the
attempt's outcome is that span's status and events.

taskq joins traces, it never starts one: with no active span and no
``traceparent`` header, an enqueue makes no span and stores NULL, and an attempt
of a task stored without one makes no span either. So a task enqueued without
tracing pays nothing beyond carrying that NULL. Nothing imports
``opentelemetry`` before a client, an API or a worker is built with
``TASKQ_OTEL=auto`` (the default); with the extra missing or ``TASKQ_OTEL=off``
they hold no :class:`Tracing` at all. The API still stores a valid
``traceparent`` header without the extra (it is only text), for the workers to
continue the trace.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from taskq.errors import FieldError, InvalidRequest

if TYPE_CHECKING:  # the extra is optional: imported for real by Tracing.load only
    from opentelemetry.trace import Span, Tracer

    from taskq.model import ClaimedTask, OutcomeKind
    from taskq.settings import Settings

log = logging.getLogger("taskq.tracing")

# The W3C Trace Context header, in HTTP requests and in envelopes (AMQP headers).
TRACEPARENT = "traceparent"
# version-trace_id-parent_id-flags, lower-case hex (W3C Trace Context, level 1).
_FORMAT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_LENGTH = 55
SYSTEM = "rabbitmq"


P = ParamSpec("P")
R = TypeVar("R")


def _contained(function: Callable[P, R | None]) -> Callable[P, R | None]:
    """``function``, whose errors are logged and answered with None: the application's
    OpenTelemetry set-up (a span processor, a sampler) must not fail an enqueue or an
    attempt."""

    @functools.wraps(function)
    def contained(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return function(*args, **kwargs)
        except Exception:
            log.exception("tracing failed in %s; going on without it", function.__name__)
            return None

    return contained


def check_traceparent(value: str, field: str = TRACEPARENT) -> str:
    """``value`` if it is a W3C ``traceparent`` taskq can carry.

    Only the 55-character form (``00-<trace id>-<parent id>-<flags>``) is taken,
    of any version but ``ff``, with neither id all zeros.

    Raises:
        InvalidRequest: naming ``field``.
    """
    if (
        len(value) != _LENGTH
        or not _FORMAT.fullmatch(value)
        or value.startswith("ff")
        or value[3:35] == "0" * 32
        or value[36:52] == "0" * 16
    ):
        message = "not one W3C traceparent: 00-<32 hex digits>-<16 hex digits>-<2 hex digits>"
        raise InvalidRequest([FieldError(field, message)])
    return value


def header(traceparent: str | None) -> dict[str, Any] | None:
    """The envelope headers that carry ``traceparent`` (None: nothing to carry)."""
    return None if traceparent is None else {TRACEPARENT: traceparent}


class Tracing:
    """Where taskq's spans go: the ``taskq`` tracer of the global tracer provider, or
    none (the extra is missing: the API still keeps ``traceparent`` headers).

    Build one with :meth:`load`.
    """

    def __init__(self, tracer: Tracer | None) -> None:
        self.tracer = tracer
        self._current_span: Callable[[], Span] | None = None
        if tracer is not None:
            from opentelemetry import trace

            self._current_span = trace.get_current_span

    @classmethod
    def load(cls, settings: Settings) -> Tracing | None:
        """The tracing ``settings`` ask for: None with ``TASKQ_OTEL=off``."""
        if settings.otel == "off":
            return None
        try:
            from opentelemetry import trace
        except ImportError:
            return cls(None)
        return cls(trace.get_tracer("taskq"))

    def sending(self, traceparent: str | None, field: str = TRACEPARENT) -> Sending | None:
        """The PRODUCER span of an enqueue, a child of ``traceparent`` (an HTTP
        request's header, checked) or else of the current span; None if neither.

        Raises:
            InvalidRequest: ``traceparent`` is not one (naming ``field``).
        """
        if traceparent is None:
            # The common case, untraced: one look at the current context.
            current = self._current_span
            if current is None or not current().get_span_context().is_valid:
                return None
            parent = None  # the current context
        else:
            check_traceparent(traceparent, field)
            if self.tracer is None:
                return Sending(None, traceparent)
            parent = _context(traceparent)
        return self._send(parent)

    @_contained
    def _send(self, parent: Any) -> Sending | None:
        """Start the PRODUCER span under ``parent`` (None: the current context)."""
        assert self.tracer is not None
        from opentelemetry import trace

        span = self.tracer.start_span(
            "send", parent, trace.SpanKind.PRODUCER, _SEND_ATTRIBUTES, record_exception=False
        )
        return Sending(span, _format(span))

    @_contained
    def attempt(self, task: ClaimedTask) -> Span | None:
        """The CONSUMER span of one attempt of ``task``, a child of its enqueuer's
        context; None if it was not traced (or the extra is missing)."""
        if task.traceparent is None or self.tracer is None:
            return None
        from opentelemetry import trace

        attributes: dict[str, str | int] = {
            **_PROCESS_ATTRIBUTES,
            "messaging.destination.name": task.queue,
            "messaging.message.id": str(task.id),
            "taskq.task.type": task.type,
            "taskq.task.attempt": task.attempts,
            "taskq.task.max_attempts": task.max_attempts,
        }
        return self.tracer.start_span(
            f"process {task.type}",
            _context(task.traceparent),
            trace.SpanKind.CONSUMER,
            attributes,
            record_exception=False,
        )


class Sending:
    """The PRODUCER span of one enqueue (or one batch of them), used as a context
    manager around it: the span ends on leaving, with the error raised if any.

    ``traceparent`` is what the tasks store: the span's own context, or the
    caller's when there is no span (the extra is missing).
    """

    def __init__(self, span: Span | None, traceparent: str) -> None:
        self.span = span
        self.traceparent = traceparent

    def __enter__(self) -> Sending:
        return self

    @_contained
    def enqueued(self, tasks: Iterable[Mapping[str, Any]]) -> None:
        """Name the span after the tasks the enqueue answered (their ids, queues, types)."""
        span = self.span
        if span is None:
            return
        tasks = list(tasks)
        types = {task.get("type") for task in tasks}
        queues = {task.get("queue") for task in tasks}
        if len(types) == 1:
            span.update_name(f"send {next(iter(types))}")
            span.set_attribute("taskq.task.type", next(iter(types)))
        if len(queues) == 1:
            span.set_attribute("messaging.destination.name", next(iter(queues)))
        if len(tasks) == 1:
            span.set_attribute("messaging.message.id", str(tasks[0].get("id")))
        else:
            span.set_attribute("messaging.batch.message_count", len(tasks))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._end(exc)

    @_contained
    def _end(self, exc: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


@_contained
def running(span: Span) -> contextvars.Context:
    """A copy of the current context in which ``span`` is the current span: the context
    an attempt runs in, so that the handler's own spans are its children."""
    from opentelemetry import context, trace

    copy = contextvars.copy_context()
    copy.run(context.attach, trace.set_span_in_context(span))
    return copy


@_contained
def ended(
    span: Span,
    kind: OutcomeKind | None,
    error: str | None = None,
    delay: float = 0.0,
    raised: BaseException | None = None,
) -> None:
    """End an attempt's span with its outcome: ``kind`` (None: the lease was lost and
    nothing is recorded), the ``error`` of a retry or failure, the ``delay`` of a retry,
    and the exception the handler raised, if any."""
    from opentelemetry.trace import Status, StatusCode

    from taskq.model import OutcomeKind

    if raised is not None:
        span.record_exception(raised)
    if kind is None:
        span.add_event("taskq.lease_lost")
    else:
        attributes: dict[str, Any] = {}
        if error is not None:
            attributes["taskq.error"] = error
        if kind is OutcomeKind.RETRY:
            attributes["taskq.retry.delay_seconds"] = delay
        span.set_attribute("taskq.outcome", kind.label)
        span.add_event(f"taskq.{kind.label}", attributes)
        if kind is OutcomeKind.COMPLETE:
            span.set_status(Status(StatusCode.OK))
        elif kind in (OutcomeKind.RETRY, OutcomeKind.FAIL):
            span.set_status(Status(StatusCode.ERROR, error))
    span.end()


_SEND_ATTRIBUTES: dict[str, str] = {
    "messaging.system": SYSTEM,
    "messaging.operation.type": "send",
    "messaging.operation.name": "send",
}
_PROCESS_ATTRIBUTES: dict[str, str] = {
    "messaging.system": SYSTEM,
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
}


def _context(traceparent: str) -> Any:
    """An OpenTelemetry context whose span is the remote one ``traceparent`` names."""
    from opentelemetry import trace

    span_context = trace.SpanContext(
        trace_id=int(traceparent[3:35], 16),
        span_id=int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def _format(span: Span) -> str:
    """The ``traceparent`` of ``span``'s context (version 00)."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
