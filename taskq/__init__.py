"""taskq: durable background tasks. RabbitMQ carries the work, Postgres holds the truth.

What applications use is importable from here::

    from taskq import Client, Context, Fail, Registry, Retry, load_settings

    handlers = Registry()

    @handlers.task("email.send.v1", max_attempts=5)
    async def send_email(payload: Email, ctx: Context) -> None: ...  # Email: a pydantic model

    async with Client.connect(load_settings()) as client:
        await send_email.enqueue(client, Email(to="a@example.com"))
        await client.enqueue("email.send.v1", {"to": "a@example.com"})  # by name, as over HTTP

Every exception taskq raises is here too (their tree is drawn in
:mod:`taskq.errors`); :mod:`taskq.testing` runs a handler without services.
The other modules are taskq's internals.

:class:`SyncClient` enqueues from sync code (Django, Flask, scripts).

:class:`Client`, :class:`SyncClient`, :class:`Worker` and :func:`run_handler` are imported on first
use, so that ``import taskq`` (and the ``taskq`` command) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from taskq.definitions import EnqueueManyOptions, EnqueueOptions, TaskDefinition
from taskq.errors import (
    BrokerError,
    Busy,
    ConfigError,
    CronProblem,
    DelayTooLong,
    Fail,
    FieldError,
    HandlerError,
    IdempotencyConflict,
    InvalidEnvelope,
    InvalidRequest,
    LimiterInUse,
    LockLost,
    MigrationError,
    Nacked,
    NoHandler,
    Overrun,
    ParentResultsTooLarge,
    Problem,
    PublishError,
    RejectedByDatabase,
    Retry,
    SchemaProblem,
    StoreError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskqError,
    TooLarge,
    TooManyLimiters,
    TooManySchedules,
    TooManyTaskTypes,
    TooManyWaiters,
    TopologyConflict,
    UnknownLimiter,
    Unpublishable,
    Unsuccessful,
    UnsupportedConnection,
    WaitTimeout,
)
from taskq.handlers import Context, Handler, Registry, Schedule
from taskq.model import Progress, TaskRecord, TaskStatus
from taskq.settings import Settings, load_settings
from taskq.workflows import (
    Signature,
    Workflow,
    WorkflowResult,
    WorkflowStatus,
    chain,
    group,
)

if TYPE_CHECKING:
    from taskq.client import Client, EnqueueResult
    from taskq.sync_client import SyncClient
    from taskq.testing import Outcome, run_handler, run_handler_sync
    from taskq.worker.worker import Worker

__version__ = "0.1.0"

# Name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "Client": "taskq.client",
    "EnqueueResult": "taskq.client",
    "SyncClient": "taskq.sync_client",
    "Worker": "taskq.worker.worker",
    "Outcome": "taskq.testing",
    "run_handler": "taskq.testing",
    "run_handler_sync": "taskq.testing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BrokerError",
    "Busy",
    "Client",
    "ConfigError",
    "Context",
    "CronProblem",
    "DelayTooLong",
    "EnqueueManyOptions",
    "EnqueueOptions",
    "EnqueueResult",
    "Fail",
    "FieldError",
    "Handler",
    "HandlerError",
    "IdempotencyConflict",
    "InvalidEnvelope",
    "InvalidRequest",
    "LimiterInUse",
    "LockLost",
    "MigrationError",
    "Nacked",
    "NoHandler",
    "Outcome",
    "Overrun",
    "ParentResultsTooLarge",
    "Problem",
    "Progress",
    "PublishError",
    "Registry",
    "RejectedByDatabase",
    "Retry",
    "Schedule",
    "SchemaProblem",
    "Settings",
    "Signature",
    "StoreError",
    "SyncClient",
    "TaskCancelled",
    "TaskDefinition",
    "TaskFailed",
    "TaskNotFound",
    "TaskRecord",
    "TaskStatus",
    "TaskqError",
    "TooLarge",
    "TooManyLimiters",
    "TooManySchedules",
    "TooManyTaskTypes",
    "TooManyWaiters",
    "TopologyConflict",
    "UnknownLimiter",
    "Unpublishable",
    "Unsuccessful",
    "UnsupportedConnection",
    "WaitTimeout",
    "Worker",
    "Workflow",
    "WorkflowResult",
    "WorkflowStatus",
    "__version__",
    "chain",
    "group",
    "load_settings",
    "run_handler",
    "run_handler_sync",
]
