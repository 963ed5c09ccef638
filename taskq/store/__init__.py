"""The only package that runs SQL: every statement comes from ``sql/queries.sql``.

It runs them through asyncpg, and the enqueue also on a caller's psycopg 3
connection (sync or async), in the caller's transaction (see :meth:`Store.enqueue`).
Driver errors stay inside; callers see :class:`~taskq.errors.StoreError`
(but for the lock-session statements, whose every error means a lost lock to
:mod:`taskq.fleet.leader`). Methods that take lists run one statement for the whole batch.

Import everything from ``taskq.store``; its modules are private:

- ``_base``: the core every part builds on: the pool, ``_fetch``/``_execute``, the relay's NOTIFY
- ``_records``: the store's own records: ``NewTask``, ``UniqueKey``, ``WorkerInfo``, ``Enqueued``
- ``_types``: the task type registry, the types' rate limits, the operators' rate limiters
- ``_gates``: paused types and concurrency limits; releasing the tasks WAITING behind them
- ``_enqueue``: the enqueue: batched inserts, idempotent replays, unique keys and their debounce
- ``_callers``: the enqueue's statements on a caller's connection (asyncpg's or psycopg 3's)
- ``_claims``: a worker's statements: claims (``OpenClaim``), heartbeats, progress, outcomes
- ``_fleet``: the publishes owed to the relay, and the sweeper's duties
- ``_schedules``: schedules and their fires
- ``_reads``: reading tasks and their events; stats, workers, the streamed events and progress
- ``_admin``: the operators' listings, cancels, retries and replays, queue purges and pauses
- ``_workflows``: workflows: their enqueue, reads and cancel, a node's parents' results
- ``_channels``: the NOTIFY channels of an install, and ``listen`` on a dedicated connection
- ``_sessions``: the lock sessions' statements (:mod:`taskq.fleet.leader`)
- ``_connect``: a connection to the writable one of several hosts (``open_connection``)
- ``_errors``: driver errors: a database going away (``DATABASE_DOWN``), data refused for good

:class:`Store` is composed of one class per part, each a subclass of ``StoreBase``
(or of the part whose methods it calls), so that strict mypy checks every call.
"""

from __future__ import annotations

from taskq.store._admin import AdminStore
from taskq.store._base import NOTIFY_IDS
from taskq.store._channels import finished_channel, listen, notify_channel, queues_channel
from taskq.store._claims import ClaimsStore, OpenClaim
from taskq.store._connect import open_connection, writable_hosts
from taskq.store._enqueue import UNIQUE_ROUNDS, EnqueueStore
from taskq.store._errors import DATABASE_DOWN, refused
from taskq.store._errors import lost as connection_lost
from taskq.store._fleet import FleetStore
from taskq.store._gates import PROMOTE_PAUSE, PROMOTE_TRIES, RELEASE_BATCH, GatesStore
from taskq.store._reads import ReadsStore
from taskq.store._records import (
    ANSWER_FIELDS,
    Enqueued,
    NewTask,
    NewWorkflow,
    UniqueKey,
    WorkerInfo,
)
from taskq.store._schedules import SCHEDULES_LOCK_KEY, SchedulesStore
from taskq.store._sessions import lock_session_limits, session_alive, try_session_lock
from taskq.store._types import LIMITERS_LOCK_KEY, TYPES_LOCK_KEY, TypesStore
from taskq.store._workflows import WorkflowEnqueued, WorkflowsStore

__all__ = [
    "ANSWER_FIELDS",
    "DATABASE_DOWN",
    "LIMITERS_LOCK_KEY",
    "NOTIFY_IDS",
    "PROMOTE_PAUSE",
    "PROMOTE_TRIES",
    "RELEASE_BATCH",
    "SCHEDULES_LOCK_KEY",
    "TYPES_LOCK_KEY",
    "UNIQUE_ROUNDS",
    "Enqueued",
    "NewTask",
    "NewWorkflow",
    "OpenClaim",
    "Store",
    "UniqueKey",
    "WorkerInfo",
    "WorkflowEnqueued",
    "connection_lost",
    "finished_channel",
    "listen",
    "lock_session_limits",
    "notify_channel",
    "open_connection",
    "queues_channel",
    "refused",
    "session_alive",
    "try_session_lock",
    "writable_hosts",
]


class Store(
    WorkflowsStore,
    AdminStore,
    ReadsStore,
    SchedulesStore,
    FleetStore,
    ClaimsStore,
    EnqueueStore,
    TypesStore,
    GatesStore,
):
    """A pool of connections to the taskq database.

    Args:
        pool: the connections.
        schema: the schema of taskq's objects (``TASKQ_DB_SCHEMA``); every
            statement names them in it, whatever a connection's ``search_path``.

    Raises:
        ValueError: if ``schema`` cannot name a schema (see :func:`taskq.sql.check_schema`).
    """
