"""The exceptions taskq raises. Driver errors are wrapped into these ``from`` the original."""

from __future__ import annotations


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
