"""Enqueue tasks from Python, without HTTP. The HTTP API is a thin layer over this.

Single enqueues from many concurrent callers are grouped into one INSERT (a
short queue drained by a few flushers), and every publish keeps its confirm in
flight concurrently with the others; published markers are written in batches.
A task's row, events and publish are what they would be one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from taskq import waiting
from taskq.amqp.broker import Link, Publisher
from taskq.definitions import TaskDefinition
from taskq.enqueue import graphs, requests, task_types, validation
from taskq.enqueue.inserts import InsertBatcher
from taskq.enqueue.offload import Offload
from taskq.enqueue.task_types import TaskType, TypeCache
from taskq.errors import FieldError, IdempotencyConflict, InvalidRequest, Overrun
from taskq.fleet.relay import Outbox
from taskq.metrics import ApiMetrics
from taskq.model import EnqueueOutcome, RequestOutcome, TaskRecord, TaskStatus
from taskq.service import Service
from taskq.settings import Settings
from taskq.store import Enqueued, NewTask, Store
from taskq.tracing import Sending, Tracing
from taskq.workflows import OnFailure, Step, Workflow, WorkflowResult, workflow_body

# The outbox publishes everything queued, up to this many rows, in one write and
# waits for their confirms before the next write: a batch forms while the previous
# one is confirmed. Eight batches of 32 at once gave the broker a write of 3 or 4
# envelopes to wake up for at 32 clients.
OUTBOX_BATCH = 256
_CREATED = EnqueueOutcome.CREATED


@dataclass(frozen=True)
class EnqueueResult:
    """The answer to one enqueue.

    Attributes:
        created: False for an idempotent replay or a duplicate (the task existed already).
        task: the answer as ``POST /enqueue`` returns it: ``id``, ``type``,
            ``queue``, ``status``, ``attempts``, ``max_attempts``, ``run_at``,
            ``created_at``; for a duplicate also ``duplicate`` and ``replaced``.
    """

    created: bool
    task: dict[str, Any]

    @property
    def duplicate(self) -> bool:
        """True when another task held the unique key: it answers, nothing was created."""
        return bool(self.task.get("duplicate", False))

    @property
    def replaced(self) -> bool:
        """True when that task (not yet started) took this enqueue's payload and run_at."""
        return bool(self.task.get("replaced", False))

    @property
    def id(self) -> uuid.UUID:
        """The task's id."""
        value = self.task["id"]
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))

    @property
    def status(self) -> TaskStatus:
        """The task's status when it was answered (ENQUEUED, or a replayed task's status)."""
        return TaskStatus(self.task["status"])

    @property
    def type(self) -> str:
        """The task type."""
        return str(self.task["type"])

    @property
    def queue(self) -> str:
        """The work queue the task goes to."""
        return str(self.task["queue"])

    @property
    def run_at(self) -> datetime:
        """When the task is due."""
        value = self.task["run_at"]
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


class Client(Service):
    """Enqueue tasks into taskq from Python.

    Open one from settings with :meth:`connect`, either as a context manager::

        async with Client.connect(settings) as client:
            await client.enqueue("email.send.v1", {"to": "a@example.com"})

    or awaited, and closed when done::

        client = await Client.connect(settings)
        try:
            ...
        finally:
            await client.close()

    Args:
        settings: connections, namespace and limits.
        store: the database; the client closes it when it stops.
        publisher: the confirming publisher.
        metrics: counters to update (the API passes its own).
        link: the broker link under ``publisher``, stopped with the client.

    A client built directly must be started (``await client.start()``) before it
    enqueues; it starts no background task in ``__init__``.
    """

    name = "taskq-client"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        *,
        metrics: ApiMetrics | None = None,
        link: Link | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.metrics = metrics or ApiMetrics()
        self.types = TypeCache(store)
        # Payload schemas are checked in threads of their own, with a deadline.
        self.offload = Offload()
        self._link = link
        self.outbox = Outbox(
            store,
            publisher,
            in_flight=OUTBOX_BATCH,
            batch=OUTBOX_BATCH,
            on_failure=self.metrics.publish_failures.inc,
        )
        self._batcher = InsertBatcher(store, on_inserted=self._publish_created)
        # Opens its LISTEN connection at the first wait only.
        self.waiters = waiting.Waiters(
            store, settings.session_database_url, limit=settings.max_waiters
        )
        # None with TASKQ_OTEL=off; see taskq.tracing.
        self.tracing = Tracing.load(settings)

    @property
    def link(self) -> Link | None:
        """The broker link under :attr:`publisher`, which the client stops with itself;
        None for a client built without one. The API reads the queue depths over it."""
        return self._link

    @classmethod
    def connect(cls, settings: Settings, *, metrics: ApiMetrics | None = None) -> Connecting:
        """Open a database pool and a broker link (which may come up later), and start.

        Await it for a started client (close it with :meth:`close`), or use it
        with ``async with``, which closes the client on leaving the block.

        Raises:
            StoreError: the database cannot be reached.
        """
        return Connecting(cls._open(settings, metrics))

    @classmethod
    async def _open(cls, settings: Settings, metrics: ApiMetrics | None) -> Client:
        # The client leaves no session state on its connections (no LISTEN, no session
        # settings or locks): the pool's reset query would be a round trip per batch.
        store = await Store.connect(
            settings.database_url,
            session_reset=False,
            statement_cache=settings.statement_cache,
            schema=settings.db_schema,
        )
        link = Link(settings.amqp_urls, name="taskq-client", heartbeat=settings.amqp_heartbeat)
        client = cls(
            settings,
            store,
            Publisher(link, settings.topology(), settings.max_delay),
            metrics=metrics,
            link=link,
        )
        await client.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.ready.wait(), 5.0)
        return client

    async def _start(self) -> None:
        if self._link is not None:
            await self._link.start()
        await self.outbox.start()
        await self._batcher.start()

    async def _stop(self, timeout: float) -> None:
        """Publish what is queued (within ``timeout``), then close everything."""
        self.offload.close()
        await self.waiters.stop()
        await self._batcher.stop()
        await self.outbox.stop(timeout)
        await self.publisher.close()
        if self._link is not None:
            await self._link.stop()
        await self.store.close()

    async def close(self) -> None:
        """Stop the client (:meth:`stop` with its default timeout)."""
        await self.stop()

    async def enqueue(
        self,
        task: TaskDefinition[Any, Any] | str,
        payload: Any,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        timeout: float | None = None,
        unique: dict[str, Any] | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> EnqueueResult:
        """Enqueue one task.

        Args:
            task: the task type: a :class:`~taskq.definitions.TaskDefinition`
                (what ``@handlers.task`` returns) or its name. Either way the
                type's defaults in the registry (queue, max attempts, timeout)
                apply to what is not given here.
            payload: a JSON object, or an instance of a pydantic model or a
                dataclass (the definition's payload model, or any), serialised
                through pydantic (``mode="json"``).
            queue, max_attempts, idempotency_key, delay, run_at, timeout: as
                the fields of ``POST /enqueue``.
            unique: at most one task per key: ``{"key": "$.user_id", "while":
                "queued" | "active" | "until_finished", "for": "10m",
                "on_conflict": "keep" | "replace"}`` (docs/producers.md); default: the
                type's. A duplicate answers with the task holding the key
                (``EnqueueResult.duplicate``).
            connection: an asyncpg connection in an open transaction: the task
                is inserted in it, and exists and is published (by the relay,
                woken at commit) only if that transaction commits.

        Raises:
            InvalidRequest: naming the fields at fault.
            IdempotencyConflict: the key was used with another request.
            StoreError: the database is unreachable.
        """
        options = (queue, max_attempts, idempotency_key, delay, run_at, timeout, unique)
        data = requests.body(task, payload, *options)
        if connection is not None:
            return (await self._send_many([data], connection, None))[0]
        return await self.submit(data)

    async def wait(self, task_id: uuid.UUID | str, *, timeout: float = 60.0) -> TaskRecord:
        """Wait until the task ends; return it if it SUCCEEDED.

        Woken by a notification from the database when the task ends (no polling);
        a task that has ended already is returned at once.

        Args:
            task_id: the task's id (``EnqueueResult.id``).
            timeout: seconds to wait at most.

        Returns:
            The task (:class:`~taskq.model.TaskRecord`): ``result`` is its handler's
            result as JSON text, :meth:`~taskq.model.TaskRecord.result_value` parses it.

        Raises:
            TaskFailed: it FAILED (``.reason`` is its last error, ``.task`` the record).
            TaskCancelled: it was CANCELLED.
            WaitTimeout: it had not ended after ``timeout`` seconds (``.task``: as it is).
            TaskNotFound: there is no such task.
            TooManyWaiters: this process waits for ``TASKQ_MAX_WAITERS`` tasks already.
            InvalidRequest: ``task_id`` or ``timeout`` is invalid (naming it).
            StoreError: the database failed.
        """
        ident, seconds = waiting.check_wait(task_id, timeout)
        task = await self.waiters.wait(ident, seconds)
        reason = None
        if task.status is TaskStatus.CANCELLED:  # the operator's reason is in its history
            events = await self.store.task_events(ident)
            reason = next((e.reason for e in reversed(events) if e.reason), None)
        return waiting.outcome(task, seconds, cancel_reason=reason)

    async def call(self, task: Any, payload: Any, *, timeout: float = 60.0, **options: Any) -> Any:
        """Enqueue a task and wait for it: its handler's result (parsed from JSON).

        ``task`` and ``options`` (``queue``, ``idempotency_key``, ``delay`` ...) are
        those of :meth:`enqueue`; ``timeout`` bounds the wait for the task's end.

        Raises:
            what :meth:`enqueue` and :meth:`wait` raise.
        """
        waiting.check_wait(uuid.UUID(int=0), timeout)  # a bad timeout enqueues nothing
        enqueued = await self.enqueue(task, payload, **options)
        return (await self.wait(enqueued.id, timeout=timeout)).result_value()

    async def submit(self, data: Any, *, traceparent: str | None = None) -> EnqueueResult:
        """Enqueue one task from a request body (a parsed JSON object).

        ``traceparent`` is the request's W3C trace context (an HTTP header); without
        it the task joins the current OpenTelemetry span, if any (:mod:`taskq.tracing`).

        Raises:
            InvalidRequest: naming the fields at fault (``traceparent`` included).
            IdempotencyConflict: the key was used with another request.
        """
        sending = self._sending(traceparent)
        if sending is None:
            return await self._submit(data, None)
        with sending:
            answer = await self._submit(data, sending.traceparent)
            sending.enqueued([answer.task])
            return answer

    def _sending(self, traceparent: str | None) -> Sending | None:
        """The enqueue's span (None: not traced), the request's ``traceparent`` checked."""
        if self.tracing is None:
            return None
        try:
            return self.tracing.sending(traceparent)
        except InvalidRequest:
            self.metrics.enqueued("", "", RequestOutcome.INVALID, None)
            raise

    async def _submit(self, data: Any, traceparent: str | None) -> EnqueueResult:
        started = time.perf_counter()
        try:
            task, body = validation.enqueue_task(data, self.settings, traceparent=traceparent)
            task_type = await self._check_type(body.type, body.queue, "")
            if body.unique is not None or task_type.unique is not None:
                task = validation.with_unique(task, body, task_type.unique, "")
            if task_type.validator is not None:
                validation.raise_all(await self._check_payloads([("", task_type, body.payload)]))
            result = await self._batcher.submit(task)
            answer = self._answer(task, result, "", publish=False)  # the batcher handed it over
        except (InvalidRequest, IdempotencyConflict) as exc:
            conflict = isinstance(exc, IdempotencyConflict)
            outcome = RequestOutcome.CONFLICT if conflict else RequestOutcome.INVALID
            self.metrics.enqueued("", "", outcome, None)
            raise
        queue = answer.task["queue"]
        self.metrics.enqueued(body.type, queue, _outcome(answer), time.perf_counter() - started)
        return answer

    async def enqueue_many(
        self,
        items: TaskDefinition[Any, Any] | str | Sequence[Any],
        payloads: Iterable[Any] | None = None,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        idempotency_keys: Sequence[str | None] | None = None,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        timeout: float | None = None,
        unique: dict[str, Any] | None = None,
        connection: asyncpg.Connection | None = None,
        traceparent: str | None = None,
    ) -> list[EnqueueResult]:
        """Enqueue up to 1000 tasks all-or-nothing in one transaction.

        Either ``enqueue_many(task, payloads, ...)``: a task of the type ``task``
        (a definition or a name) per payload, each with the options given
        (``idempotency_keys``: one key or ``None`` per payload); or
        ``enqueue_many(items)``: request bodies as ``POST /enqueue/batch`` takes
        them, each naming its type. ``traceparent`` is as for :meth:`submit`: the
        batch is one enqueue span. Tasks of the batch that share a unique key are
        duplicates of the first of them.

        Raises:
            InvalidRequest: naming the index and field of every error; nothing is
                created. Also naming ``payloads`` (or an option) given with
                request bodies, or ``payloads`` missing with a type.
            IdempotencyConflict: a key was used with another request; nothing is created.
        """
        options = (queue, max_attempts, idempotency_keys, delay, run_at, timeout, unique)
        bodies = requests.bodies(items, payloads, *options)
        return await self._send_many(bodies, connection, traceparent)

    async def _send_many(
        self, items: Sequence[Any], connection: asyncpg.Connection | None, traceparent: str | None
    ) -> list[EnqueueResult]:
        """Enqueue request bodies as one batch, in an enqueue span if traced."""
        sending = self._sending(traceparent)
        if sending is None:
            return await self._enqueue_many(items, connection, None)
        with sending:
            answers = await self._enqueue_many(items, connection, sending.traceparent)
            sending.enqueued(a.task for a in answers)
            return answers

    async def _enqueue_many(
        self, items: Sequence[Any], connection: asyncpg.Connection | None, traceparent: str | None
    ) -> list[EnqueueResult]:
        errors: list[InvalidRequest] = []
        tasks: list[NewTask] = []
        checks: list[tuple[str, TaskType, dict[str, Any]]] = []
        registry: dict[str, TaskType | None] = {}  # each type looked up once a batch
        for index, item in enumerate(validation.batch_items({"tasks": list(items)})):
            prefix = f"tasks[{index}]"
            try:
                task, body = validation.enqueue_task(
                    item, self.settings, prefix=prefix, traceparent=traceparent
                )
                if body.type not in registry:
                    registry[body.type] = await self.types.get(body.type)
                task_type = task_types.check_type(
                    registry[body.type], body.type, body.queue, self.settings.queues, prefix + "."
                )
                task = validation.with_unique(task, body, task_type.unique, prefix + ".")
            except InvalidRequest as exc:
                errors.append(exc)
            else:
                tasks.append(task)
                if task_type.validator is not None:
                    checks.append((prefix + ".", task_type, body.payload))
        if checks:
            errors += await self._check_payloads(checks)
            errors.sort(key=lambda e: _index(e.errors[0].field))
        validation.raise_all(errors)
        results = await self.store.enqueue(tasks, connection, all_or_nothing=True)
        for index, (task, result) in enumerate(zip(tasks, results, strict=True)):
            if result.outcome == EnqueueOutcome.CONFLICT:
                assert task.idempotency_key is not None
                raise IdempotencyConflict(
                    task.idempotency_key, result.task_id, f"tasks[{index}].idempotency_key"
                )
            if result.outcome == EnqueueOutcome.UNKNOWN_TYPE:
                raise InvalidRequest([FieldError(f"tasks[{index}].type", "unknown task type")])
        if connection is not None:  # published by the relay when the caller commits
            return [EnqueueResult(r.outcome is _CREATED, r.answer or {}) for r in results]
        answers = [
            self._answer(t, r, f"tasks[{i}].")
            for i, (t, r) in enumerate(zip(tasks, results, strict=True))
        ]
        # Counted once per label set, not per task (each labels() call takes a lock).
        counts = Counter((a.task["type"], a.task["queue"], _outcome(a)) for a in answers)
        for labels, count in counts.items():
            self.metrics.enqueue_total.labels(*labels).inc(count)
        return answers

    async def enqueue_workflow(
        self,
        flow: Step | Workflow | dict[str, Any],
        *,
        name: str | None = None,
        on_failure: OnFailure | None = None,
        idempotency_key: str | None = None,
    ) -> WorkflowResult:
        """Enqueue a workflow: a chain, a group, a :class:`~taskq.workflows.Workflow` (see
        :mod:`taskq.workflows`) or the body of ``POST /workflows``.

        Every node's task exists at once: those without parents ENQUEUED, the others
        WAITING for their parents. Each runs once all its parents have succeeded.

        Args:
            name: a name to find it by.
            on_failure: ``fail_fast`` (default) or ``continue``.
            idempotency_key: the same key and definition give the same workflow.

        Raises:
            InvalidRequest: naming the node at fault (a cycle, an unknown type, a
                dependency on no node, too many nodes or edges, an invalid enqueue);
                nothing is created.
            IdempotencyConflict: the key was used with another definition.
        """
        body = workflow_body(
            flow, name=name, on_failure=on_failure, idempotency_key=idempotency_key
        )
        return await self.submit_workflow(body)

    async def submit_workflow(self, data: Any, *, traceparent: str | None = None) -> WorkflowResult:
        """Enqueue a workflow from a ``POST /workflows`` body (a parsed JSON object); see
        :meth:`enqueue_workflow`."""
        workflow = graphs.plan(data, self.settings, traceparent=traceparent)
        errors: list[InvalidRequest] = []
        checks: list[tuple[str, TaskType, dict[str, Any]]] = []
        registry: dict[str, TaskType | None] = {}  # each type looked up once
        for index, (task, node) in enumerate(zip(workflow.tasks, workflow.names, strict=True)):
            prefix = f"nodes[{index}]."
            if task.type not in registry:
                registry[task.type] = await self.types.get(task.type)
            try:
                task_type = task_types.check_type(
                    registry[task.type], task.type, task.queue, self.settings.queues, prefix
                )
            except InvalidRequest as exc:
                errors.append(_of_node(exc, node))
                continue
            if task_type.validator is not None:
                checks.append((prefix, task_type, orjson.loads(task.payload_json)))
        if checks:
            errors += await self._check_payloads(checks)
        validation.raise_all(errors)
        done = await self.store.enqueue_workflow(workflow)
        if done.outcome is EnqueueOutcome.UNKNOWN_TYPE:
            assert done.unknown is not None
            unknown = workflow.tasks[done.unknown]
            field = f"nodes[{done.unknown}].type"
            message = f"unknown or disabled task type {unknown.type!r}"
            raise _of_node(
                InvalidRequest([FieldError(field, message)]), workflow.names[done.unknown]
            )
        assert done.workflow_id is not None
        if done.outcome is EnqueueOutcome.CONFLICT:
            assert workflow.idempotency_key is not None
            raise IdempotencyConflict(workflow.idempotency_key, done.workflow_id)
        for owed in done.owed:
            self.outbox.submit(owed)
        if done.outcome is EnqueueOutcome.REPLAYED:
            found = await self.store.workflow(done.workflow_id)
            assert found is not None
            record, found_nodes = found
            body = {**record.to_json(), "nodes": [_node_answer(n) for n in found_nodes]}
            return WorkflowResult(False, body)
        nodes = [
            {"name": name, "task_id": task.id, "type": task.type,
             "status": "WAITING" if parents else "ENQUEUED"}
            for name, task, parents in zip(
                workflow.names, workflow.tasks, workflow.parents, strict=True
            )
        ]  # fmt: skip
        body = {
            "id": workflow.id,
            "name": workflow.name,
            "status": "RUNNING",
            "on_failure": workflow.on_failure,
            "nodes": nodes,
        }
        return WorkflowResult(True, body)

    async def _check_type(self, name: str, queue: str | None, prefix: str) -> TaskType:
        task_type = await self.types.get(name)
        return task_types.check_type(task_type, name, queue, self.settings.queues, prefix)

    async def _check_payloads(
        self, checks: list[tuple[str, TaskType, dict[str, Any]]]
    ) -> list[InvalidRequest]:
        """Check payloads against their types' schemas off the event loop, with a deadline.

        Raises:
            taskq.enqueue.offload.Busy: every checking thread stayed taken (try again).
        """
        progress = [0]
        deadline = task_types.check_deadline(len(checks))
        try:
            return await self.offload.run(deadline, task_types.check_payloads, checks, progress)
        except Overrun:
            field = checks[progress[0]][0] + "payload"
            message = f"checking it against the type's payload_schema took over {deadline:g}s"
            return [InvalidRequest([FieldError(field, message)])]

    def _publish_created(self, results: Sequence[Enqueued]) -> None:
        """Hand the created rows of ``results`` to the outbox: they are durable now."""
        for result in results:
            if result.owes_publish:
                self.outbox.submit(result.owed())

    def _answer(
        self, task: NewTask, result: Enqueued, prefix: str, *, publish: bool = True
    ) -> EnqueueResult:
        """Turn the store's answer into ours; with ``publish``, publish what was created."""
        if result.outcome == EnqueueOutcome.CONFLICT:
            assert task.idempotency_key is not None
            raise IdempotencyConflict(
                task.idempotency_key, result.task_id, prefix + "idempotency_key"
            )
        if result.outcome == EnqueueOutcome.UNKNOWN_TYPE:
            raise InvalidRequest([FieldError(prefix + "type", f"unknown task type {task.type!r}")])
        assert result.answer is not None
        created = result.outcome is _CREATED
        if publish and result.owes_publish:
            # The task is durable now; the outbox publishes it in the background.
            self.outbox.submit(result.owed())
        return EnqueueResult(created, result.answer)


class Connecting:
    """What :meth:`Client.connect` returns: await it, or use it with ``async with``."""

    def __init__(self, opening: Coroutine[Any, Any, Client]) -> None:
        self._opening = opening
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._opening.__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._opening
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.close()


def _of_node(exc: InvalidRequest, node: str) -> InvalidRequest:
    """``exc`` with the node's name in each message."""
    return InvalidRequest([FieldError(e.field, f"{e.message} (node {node!r})") for e in exc.errors])


def _node_answer(node: Any) -> dict[str, Any]:
    return {"name": node.name, "task_id": node.task_id, "type": node.type, "status": node.status}


def _index(field: str) -> int:
    """The item index of a batch error's field (``tasks[12].payload`` -> 12)."""
    return int(field[6 : field.index("]")]) if field.startswith("tasks[") else -1


def _outcome(answer: EnqueueResult) -> RequestOutcome:
    """The metric's outcome of an answered request."""
    if answer.created:
        return RequestOutcome.CREATED
    if answer.duplicate:
        return RequestOutcome.REPLACED if answer.replaced else RequestOutcome.DUPLICATE
    return RequestOutcome.REPLAYED
