"""The exceptions taskq raises, all in this module. Driver errors are wrapped into
these ``from`` the original (asyncpg's stay inside :mod:`taskq.store`, aio-pika's
inside :mod:`taskq.amqp.broker`).

The hierarchy::

    TaskqError                     taskq failed (the root of what taskq raises)
    ├── ConfigError                a setting is invalid
    ├── StoreError                 the database did not answer as expected
    │   ├── RejectedByDatabase     it refused the data (a constraint, a value)
    │   ├── LockLost               no longer the active relay or sweeper
    │   └── MigrationError         the schema could not be migrated
    ├── BrokerError                the broker did not answer as expected
    │   ├── PublishError           a publish was not confirmed
    │   │   ├── Unpublishable      nothing routes the envelope
    │   │   └── Nacked             the broker refused the publish
    │   └── TopologyConflict       an exchange or queue exists with other properties
    ├── TooManyTaskTypes           the task type registry is full
    ├── TooManySchedules           there are TASKQ_MAX_SCHEDULES schedules already
    ├── TooManyLimiters            there are as many rate limiters as allowed
    ├── UnknownLimiter             a task type names a rate limiter that does not exist
    ├── LimiterInUse               a rate limiter task types use cannot be deleted
    ├── DelayTooLong               a delay beyond what the delay levels carry
    ├── IdempotencyConflict        an idempotency key reused with another request
    ├── InvalidRequest             an enqueue or admin request is invalid (names the fields)
    │   └── TooLarge               a payload over TASKQ_MAX_PAYLOAD_BYTES
    ├── InvalidEnvelope            a message is not a taskq envelope
    ├── HandlerError               the handlers could not be loaded or declared
    ├── NoHandler                  this worker has no handler for a task's type
    ├── ParentResultsTooLarge      a workflow node's parents' results are too large to read
    ├── Overrun                    a payload check ran past its deadline
    ├── Busy                       every payload-checking thread stayed taken
    ├── TaskNotFound               no task has the id waited for
    ├── Unsuccessful               a task waited for ended other than SUCCEEDED
    │   ├── TaskFailed             it FAILED (its last error is the reason)
    │   └── TaskCancelled          it was CANCELLED
    ├── WaitTimeout                a task waited for did not end in time
    ├── TooManyWaiters             this process waits for as many tasks as it may
    └── UnsupportedConnection      connection= is no connection taskq can enqueue on
        (also a TypeError)

    Retry                          raised by a handler: another attempt after a delay
    Fail                           raised by a handler: FAILED now, no further attempt
    SchemaProblem (ValueError)     a payload schema taskq refuses, and where in it
    CronProblem (ValueError)       a cron expression or time zone taskq refuses, and which field
    Problem                        an HTTP error, answered as problem+json

:class:`Retry` and :class:`Fail` are control flow that handler code raises, not
errors of taskq, so they do not derive from :class:`TaskqError` (and are not
logged as errors). :class:`Problem` is the answer of an HTTP request.

Old import paths (``taskq.handlers.Retry``, ``taskq.enqueue.validation.InvalidRequest``,
``taskq.web.http.Problem`` ...) still work: those modules import the classes from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class TaskqError(Exception):
    """taskq failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(TaskqError):
    """The configuration is invalid."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"invalid {variable}: {problem}")


class StoreError(TaskqError):
    """The database did not answer as expected."""


class RejectedByDatabase(StoreError):
    """The database refused the data (a constraint or a value it cannot store)."""


class LockLost(StoreError):
    """This process no longer holds the lock that made it the active relay or sweeper."""


class MigrationError(StoreError):
    """The schema could not be migrated."""


class TooManySchedules(TaskqError):
    """There are as many schedules as TASKQ_MAX_SCHEDULES allows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"there are {limit} schedules, the maximum (TASKQ_MAX_SCHEDULES): raise the limit"
            " or delete unused ones"
        )


class TooManyLimiters(TaskqError):
    """There are as many rate limiters as taskq.ratelimits.MAX_LIMITERS allows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"there are {limit} rate limiters, the maximum: delete unused ones")


class UnknownLimiter(TaskqError):
    """A task type names a rate limiter that does not exist."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no rate limiter {name!r}: create it first (PUT /limits/{name})")


class LimiterInUse(TaskqError):
    """A rate limiter cannot be deleted while task types use it."""

    def __init__(self, name: str, types: list[str]) -> None:
        self.name = name
        self.types = types
        super().__init__(
            f"rate limiter {name!r} is used by task types {', '.join(types)}:"
            " change their rate_limit first"
        )


class TooManyTaskTypes(TaskqError):
    """The task type registry is full (TASKQ_MAX_TASK_TYPES)."""

    def __init__(self, limit: int, names: list[str]) -> None:
        self.limit = limit
        self.names = names
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        super().__init__(
            f"the task type registry holds its maximum of {limit} types (TASKQ_MAX_TASK_TYPES):"
            f" cannot add {shown}; raise the limit or delete unused rows of task_type"
        )


class BrokerError(TaskqError):
    """The broker did not answer as expected."""


class PublishError(BrokerError):
    """A publish was not confirmed by the broker (nacked, returned or timed out)."""


class Unpublishable(PublishError):
    """The envelope cannot be published as it is: nothing routes it (its work queue is
    not in the topology, or the broker returned it as unroutable)."""


class Nacked(PublishError):
    """The broker refused the publish (a nack), e.g. for a queue without a leader."""


class TopologyConflict(BrokerError):
    """An object already exists on the broker with other properties than taskq wants."""

    def __init__(self, kind: str, name: str, existing: str, wanted: str) -> None:
        self.kind = kind
        self.name = name
        self.existing = existing
        self.wanted = wanted
        super().__init__(f"{kind} '{name}' exists with {existing}, but taskq wants {wanted}")


class DelayTooLong(TaskqError):
    """The delay exceeds the maximum the delay levels can carry."""


class IdempotencyConflict(TaskqError):
    """The idempotency key was already used with a different request."""

    def __init__(self, key: str, task_id: object, field: str = "idempotency_key") -> None:
        self.key = key
        self.task_id = task_id
        self.field = field
        super().__init__(
            f"idempotency key {key!r} was used for task {task_id} with another request"
        )


@dataclass(frozen=True)
class FieldError:
    """One field at fault in a request: ``field`` is its path (``tasks[3].payload``)."""

    field: str
    message: str


class InvalidRequest(TaskqError):
    """The request is invalid."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))


class TooLarge(InvalidRequest):
    """A payload exceeds TASKQ_MAX_PAYLOAD_BYTES."""


class InvalidEnvelope(TaskqError):
    """The message is not a taskq envelope."""


class HandlerError(TaskqError):
    """The handlers could not be loaded or declared."""


class NoHandler(TaskqError):
    """This worker has no handler for the task's type."""


class ParentResultsTooLarge(TaskqError):
    """A workflow node's parents' results are more than TASKQ_MAX_PARENT_RESULTS_BYTES
    of JSON in all: the worker does not read them, the node fails."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"its parents' results are {size} bytes of JSON, more than"
            f" TASKQ_MAX_PARENT_RESULTS_BYTES ({limit})"
        )
        self.size = size
        self.limit = limit


class Overrun(TaskqError):
    """The check ran past its deadline and was interrupted."""


class Busy(TaskqError):
    """Every checking thread was taken until the deadline: try again later."""


class UnsupportedConnection(TaskqError, TypeError):
    """The ``connection=`` of an enqueue is no connection taskq can enqueue on."""


class TaskNotFound(TaskqError):
    """No task has this id (it was never enqueued, or retention deleted it)."""

    def __init__(self, task_id: object) -> None:
        self.task_id = task_id
        super().__init__(f"no task {task_id}")


class Unsuccessful(TaskqError):
    """A task waited for ended, but did not succeed.

    Attributes:
        task: the finished task (a :class:`taskq.model.TaskRecord`).
        reason: why it ended so (its last error, or the cancel's reason).
    """

    def __init__(self, task: Any, reason: str) -> None:
        self.task = task
        self.reason = reason
        super().__init__(f"task {task.id} ({task.type}) {task.status}: {reason}")


class TaskFailed(Unsuccessful):
    """A task waited for FAILED: no attempt left, or its handler failed it for good."""


class TaskCancelled(Unsuccessful):
    """A task waited for was CANCELLED by an operator (or a purge of its queue)."""


class WaitTimeout(TaskqError):
    """A task waited for had not ended when the wait's timeout passed.

    Attributes:
        task: the task as it was at the timeout (a :class:`taskq.model.TaskRecord`).
        timeout: the seconds waited.
    """

    def __init__(self, task: Any, timeout: float) -> None:
        self.task = task
        self.timeout = timeout
        super().__init__(f"task {task.id} is still {task.status} after {timeout:g}s")


class TooManyWaiters(TaskqError):
    """This process waits for as many tasks at once as it may (TASKQ_MAX_WAITERS)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"this process waits for {limit} tasks already (TASKQ_MAX_WAITERS); try again later"
        )


class Retry(Exception):
    """Ask for another attempt after ``delay`` seconds (default: the task type's backoff).

    The attempt counts: with no attempt left the task is FAILED instead.

    Args:
        delay: seconds until the next attempt; ``None`` uses the backoff.
        reason: recorded as the attempt's error (``Retry: <reason>``).
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        if delay is not None and delay < 0:
            raise ValueError("a retry delay cannot be negative")
        self.delay = delay
        self.reason = reason
        super().__init__(reason)


class Fail(Exception):
    """End the task as FAILED now, without further attempts; it goes to the DLQ.

    Args:
        reason: recorded as the task's error and in the dead letter's headers.
    """

    def __init__(self, reason: str = "failed by the handler") -> None:
        self.reason = reason
        super().__init__(reason)


class SchemaProblem(ValueError):
    """A payload schema taskq refuses; ``path`` is where, inside the schema."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"at {path}: {message}" if path else message)


class CronProblem(ValueError):
    """A cron expression or time zone taskq refuses; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class Problem(Exception):
    """An HTTP error answered as problem+json (:func:`taskq.web.http.problem_response`)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors or []
        self.headers = headers
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """The problem+json document (RFC 9457)."""
        body: dict[str, Any] = {
            "type": "urn:taskq:problem:" + self.title.lower().replace(" ", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["field"] = self.errors[0].field
            body["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        body.update(self.extra)
        return body
