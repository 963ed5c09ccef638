"""Task definitions: what ``@handlers.task(...)`` returns.

A :class:`TaskDefinition` is still the function it decorates (call it as before,
in tests or elsewhere), and it enqueues its own tasks::

    @handlers.task("email.send.v1", queue="high")
    async def send_email(payload: Email, ctx: Context) -> None: ...

    await send_email.enqueue(client, Email(to="a@example.com"), delay=60)

:meth:`TaskDefinition.enqueue` is a plain method that returns what
``client.enqueue(definition, ...)`` returns: an awaitable with the asyncio
:class:`~taskq.client.Client`, the answer itself with a client whose ``enqueue``
is a plain method. :class:`Enqueuing` and :class:`EnqueuingMany` are the
protocols a client satisfies for that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypedDict, TypeVar, Unpack

from taskq.payloads import PayloadModel, to_payload
from taskq.workflows import Signature

if TYPE_CHECKING:
    from taskq.handlers import Context, Handler

P = TypeVar("P")
R = TypeVar("R")
A_co = TypeVar("A_co", covariant=True)


class EnqueueOptions(TypedDict, total=False):
    """The options of one enqueue: the fields of ``POST /enqueue`` besides the type and
    payload, and ``connection`` (the caller's database connection in an open transaction)."""

    queue: str | None
    max_attempts: int | None
    idempotency_key: str | None
    delay: float | None
    run_at: datetime | str | None
    timeout: float | None
    unique: dict[str, Any] | None
    connection: Any


class EnqueueManyOptions(TypedDict, total=False):
    """The options of an ``enqueue_many``: as :class:`EnqueueOptions`, but one
    idempotency key (or ``None``) per payload."""

    queue: str | None
    max_attempts: int | None
    idempotency_keys: Sequence[str | None] | None
    delay: float | None
    run_at: datetime | str | None
    timeout: float | None
    unique: dict[str, Any] | None
    connection: Any


class Enqueuing(Protocol[A_co]):
    """A client that enqueues one task: ``taskq.Client`` (its answer is awaitable) or a
    sync client (its answer is the :class:`~taskq.client.EnqueueResult`)."""

    def enqueue(
        self, task: TaskDefinition[Any, Any] | str, payload: Any, **options: Unpack[EnqueueOptions]
    ) -> A_co: ...


class EnqueuingMany(Protocol[A_co]):
    """A client that enqueues many tasks of one type at once (see :class:`Enqueuing`)."""

    def enqueue_many(
        self,
        items: TaskDefinition[Any, Any] | str | Sequence[Any],
        payloads: Iterable[Any] | None = None,
        **options: Unpack[EnqueueManyOptions],
    ) -> A_co: ...


class TaskDefinition(Generic[P, R]):
    """A registered handler: callable as its function, and able to enqueue its tasks.

    ``P`` is the payload's type (a ``dict``, or the handler's payload model) and
    ``R`` what the function returns (for an ``async def``, its coroutine).

    Attributes:
        name: the task type.
        handler: the registered :class:`~taskq.handlers.Handler` (the options,
            and the function the worker calls).
        function: the decorated function itself.
        model: the payload and result adapters, if its annotations name a model.
    """

    # Set by functools.update_wrapper, as on the function itself.
    __wrapped__: Callable[..., Any]
    __name__: str
    __qualname__: str

    def __init__(
        self, handler: Handler, function: Callable[[P, Context], R], model: PayloadModel | None
    ) -> None:
        self.name = handler.name
        self.handler = handler
        self.function = function
        self.model = model
        functools.update_wrapper(self, function)

    def __call__(self, payload: P, ctx: Context) -> R:
        """Call the function itself (no parsing, no worker): as calling it undecorated."""
        return self.function(payload, ctx)

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name!r} of {getattr(self.function, '__qualname__', '?')}>"

    def enqueue(
        self,
        client: Enqueuing[A_co],
        payload: P | dict[str, Any],
        **options: Unpack[EnqueueOptions],
    ) -> A_co:
        """Enqueue a task of this type with ``client``: ``client.enqueue(self, payload, ...)``.

        ``payload`` is a dict, or an instance of the handler's payload model
        (serialised through it). The options are :class:`EnqueueOptions`
        (``delay``, ``run_at``, ``idempotency_key``, ``queue``, ...); the task
        type's defaults (queue, max attempts, timeout) apply to the others, as
        when it is enqueued by name. Returns what the client returns: await it
        with :class:`taskq.Client`.
        """
        return client.enqueue(self, payload, **options)

    def enqueue_many(
        self,
        client: EnqueuingMany[A_co],
        payloads: Iterable[P | dict[str, Any]],
        **options: Unpack[EnqueueManyOptions],
    ) -> A_co:
        """Enqueue a task of this type per payload, all or nothing, in one transaction.

        The options (:class:`EnqueueManyOptions`) apply to every task;
        ``idempotency_keys``, if given, has one key (or ``None``) per payload.
        Returns what ``client.enqueue_many`` returns (a list of results,
        awaitable with :class:`taskq.Client`).
        """
        return client.enqueue_many(self, payloads, **options)

    def s(
        self,
        payload: P | dict[str, Any],
        *,
        name: str | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        run_at: datetime | str | None = None,
    ) -> Signature:
        """A node of a workflow running this task with ``payload`` (see :mod:`taskq.workflows`):
        ``chain(fetch.s(a), group(resize.s(b), resize.s(c)), publish.s(d))``.

        ``name`` names the node (default: the type's name, then ``<type>#2``...); the
        other options are those of one enqueue, left to the type's defaults when not given.
        """
        options: dict[str, Any] = {
            key: value
            for key, value in (
                ("queue", queue), ("max_attempts", max_attempts), ("timeout", timeout),
                ("delay", delay),
                ("run_at", run_at.isoformat() if isinstance(run_at, datetime) else run_at),
            )
            if value is not None
        }  # fmt: skip
        return Signature(self, payload, name=name, **options)

    def to_payload(self, payload: Any) -> Any:
        """``payload`` as the JSON object an enqueue stores (a model instance serialised)."""
        if self.model is not None:
            return self.model.to_payload(payload)
        return to_payload(payload)
