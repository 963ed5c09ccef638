"""The envelope: the small AMQP message that carries a task id to a worker.

The body is ``{"id", "type", "attempt"}``; the payload stays in Postgres. The
AMQP properties and ``x-taskq-*`` headers repeat what an operator needs to read
a message in the management UI without decoding anything.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pamqp.commands import Basic

from taskq.amqp.frames import JSON as CONTENT_TYPE
from taskq.amqp.frames import PERSISTENT, Persistent

# Defined in taskq.errors; importing them from here keeps working.
from taskq.errors import InvalidEnvelope as InvalidEnvelope

MAX_BODY_BYTES = 4096
# What a real envelope can carry: a task type name (at most 200 characters, see
# taskq.enqueue.validation.TYPE_NAME) travels in the AMQP ``type`` property, a short
# string of at most 255 bytes; attempts never exceed max_attempts (at most 100).
# Anything larger is forged, and would break the publish that dead-letters it.
MAX_TYPE_BYTES = 200
MAX_ATTEMPT = 100

HEADER_ATTEMPT = "x-taskq-attempt"
HEADER_DUE = "x-taskq-due"
HEADER_QUEUE = "x-taskq-queue"
HEADER_DELAY = "x-taskq-delay"


@dataclass(frozen=True, slots=True)
class Envelope:
    """Which task to run and which attempt this delivery is for."""

    id: uuid.UUID
    type: str
    attempt: int

    def body(self) -> bytes:
        data = {"id": str(self.id), "type": self.type, "attempt": self.attempt}
        try:
            return orjson.dumps(data)
        except orjson.JSONEncodeError:  # an attempt beyond 64 bits: only forged envelopes
            return json.dumps(data, separators=(",", ":")).encode()

    def properties(
        self,
        queue: str,
        *,
        due: datetime | None = None,
        delay: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> Basic.Properties:
        """The AMQP properties of this envelope's persistent message, bound for work
        queue ``queue``: message id, type, content type, timestamp and headers."""
        return Basic.Properties(
            message_id=str(self.id),
            message_type=self.type,
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            timestamp=datetime.now(UTC),
            headers=self._headers(queue, due, delay, headers),
        )

    def persistent(
        self,
        queue: str,
        *,
        due_ms: int | None = None,
        delay: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> Persistent:
        """The same properties as :meth:`properties` (``due_ms``: the due time in
        milliseconds since the epoch), in the form the publisher writes without pamqp
        (:class:`taskq.amqp.frames.Persistent`)."""
        all_headers: dict[str, Any] = {HEADER_ATTEMPT: self.attempt, HEADER_QUEUE: queue}
        if due_ms is not None:
            all_headers[HEADER_DUE] = _due_text(due_ms)
        return Persistent(
            str(self.id), self.type, int(time.time()), _more(all_headers, delay, headers)
        )

    def _headers(
        self, queue: str, due: datetime | None, delay: int, headers: dict[str, Any] | None
    ) -> dict[str, Any]:
        all_headers: dict[str, Any] = {HEADER_ATTEMPT: self.attempt, HEADER_QUEUE: queue}
        if due is not None:
            all_headers[HEADER_DUE] = due.astimezone(UTC).isoformat(timespec="milliseconds")
        return _more(all_headers, delay, headers)

    @classmethod
    def parse(cls, body: bytes) -> Envelope:
        """Read an envelope from a message body.

        Raises:
            InvalidEnvelope: naming what is wrong with the body.
        """
        if len(body) > MAX_BODY_BYTES:
            raise InvalidEnvelope(f"body of {len(body)} bytes is too large for an envelope")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = cls._loads_strictly(body)
        else:
            if isinstance(data, dict) and isinstance(data.get("attempt"), float):
                data = cls._loads_strictly(body)  # orjson reads integers beyond 64 bits as floats
        if not isinstance(data, dict):
            raise InvalidEnvelope("body is not a JSON object")
        return cls._from_dict(data)

    @staticmethod
    def _loads_strictly(body: bytes) -> Any:
        """Decode with the standard library what orjson refused (to say why) or read
        differently (integers beyond 64 bits), so the answer is the same either way."""
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidEnvelope(f"body is not JSON: {exc}") from None
        except RecursionError:  # a few kilobytes of "[[[[..." nest deeper than the stack
            raise InvalidEnvelope("body is JSON nested too deeply for an envelope") from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Envelope:
        try:
            task_id = uuid.UUID(data["id"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InvalidEnvelope("'id' is missing or not a UUID") from None
        task_type, attempt = data.get("type"), data.get("attempt")
        if not isinstance(task_type, str) or not task_type:
            raise InvalidEnvelope("'type' is missing or not a string")
        if len(task_type.encode(errors="replace")) > MAX_TYPE_BYTES:
            raise InvalidEnvelope(f"'type' is longer than {MAX_TYPE_BYTES} bytes")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
            raise InvalidEnvelope("'attempt' is missing or not a non-negative integer")
        if attempt > MAX_ATTEMPT:
            raise InvalidEnvelope(f"'attempt' is larger than {MAX_ATTEMPT}")
        return cls(task_id, task_type, attempt)


def _more(
    all_headers: dict[str, Any], delay: int, headers: dict[str, Any] | None
) -> dict[str, Any]:
    if delay:
        all_headers[HEADER_DELAY] = delay
    if headers:
        all_headers.update(headers)
    return all_headers


@functools.lru_cache(maxsize=256)
def _due_text(due_ms: int) -> str:
    """A due time in milliseconds since the epoch as the due header writes it (the
    envelopes of one millisecond share it)."""
    due = datetime.fromtimestamp(due_ms // 1000, UTC).replace(microsecond=due_ms % 1000 * 1000)
    return due.isoformat(timespec="milliseconds")
