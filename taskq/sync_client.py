"""Enqueue from sync code (Django, Flask, scripts): :class:`SyncClient`.

A :class:`SyncClient` runs one async :class:`~taskq.client.Client` on an event
loop in a thread of its own, started on first use, and each of its methods
hands the call to that loop and waits for the answer. So it has the
:class:`Client`'s methods, with their arguments, answers and errors, and any
number of threads may share one: one pool of connections and the same batched
inserts serve every thread of the process.

A process forked after its first use (a gunicorn or uWSGI worker forked from a
master that imported and used the client) does not inherit that thread, only its
memory: the child notices that its process id changed and starts a thread and
connections of its own, leaving the parent's untouched.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from taskq.client import Client
from taskq.errors import UnsupportedConnection
from taskq.settings import Settings, load_settings

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(
    method: Callable[Concatenate[Client, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncClient, P], R]:
    """``method`` of :class:`Client` as a blocking method of :class:`SyncClient`,
    with its signature (for type checkers too) and its docstring."""

    @functools.wraps(method)
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs.get("connection") is not None:
            kwargs["connection"] = caller_connection(kwargs["connection"])
        return self._run(method, *args, **kwargs)

    return call


class SyncClient:
    """Enqueue tasks into taskq from sync code: the :class:`~taskq.Client`'s methods,
    blocking.

    Make one per process, e.g. at import time in a Django or Flask app; it connects
    on first use, and any thread may use it::

        tasks = SyncClient(load_settings())

        def signup(request):
            tasks.enqueue("email.send.v1", {"to": request.POST["email"]})

    Inside the caller's own transaction, with its psycopg 3 connection (or Django's
    connection, when Django uses psycopg 3), the task exists and is published only
    if that transaction commits::

        with transaction.atomic():
            order = Order.objects.create(...)
            tasks.enqueue("order.confirm.v1", {"order": order.pk}, connection=connection)

    Errors are those of :class:`~taskq.Client`, raised in the calling thread.
    Close it with :meth:`close` or use it as a context manager; one still open at
    interpreter exit is closed then.

    Args:
        settings: connections, namespace and limits (default: :func:`taskq.load_settings`).
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._loop: _Loop | None = None
        self._closed = False
        # A forked child's copy of the parent's loop: never used or closed, only kept.
        self._inherited: _Loop | None = None
        _open.add(self)

    enqueue = _blocking(Client.enqueue)
    enqueue_many = _blocking(Client.enqueue_many)
    submit = _blocking(Client.submit)
    enqueue_workflow = _blocking(Client.enqueue_workflow)
    submit_workflow = _blocking(Client.submit_workflow)
    wait = _blocking(Client.wait)
    # mypy matches a ParamSpec against a method that takes **options only if its self is
    # positional-only; the signature is Client.call's all the same.
    call = _blocking(Client.call)  # type: ignore[arg-type]

    def close(self, timeout: float | None = None) -> None:
        """Publish what is queued (for up to ``timeout`` seconds, ``None``: the
        client's default), close the connections and stop the thread. Later calls
        raise ``RuntimeError``; closing twice does nothing."""
        with self._lock:
            self._closed = True
            loop, self._loop = self._loop, None
        if loop is not None and self._pid == os.getpid():
            loop.close(timeout)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(
        self,
        method: Callable[Concatenate[Client, P], Coroutine[Any, Any, R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        loop = self._started()

        async def call() -> R:
            return await method(loop.client, *args, **kwargs)

        return loop.run(call())

    def _started(self) -> _Loop:
        """The running loop, started on first use (again in a forked child)."""
        if self._pid != os.getpid():
            self._forked()
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._closed:
                raise RuntimeError("this SyncClient is closed")
            if self._loop is None:
                self._loop = _Loop(self.settings)
            return self._loop

    def _forked(self) -> None:
        # The parent's thread does not run here, and its connections are the
        # parent's: closing them from here would speak on them. They are kept
        # (collecting them would close their sockets' copies) and never used.
        self._inherited = self._loop
        self._loop = None
        self._lock = threading.Lock()  # it may have been held by a thread at the fork
        self._pid = os.getpid()


class _Loop:
    """An event loop in a daemon thread, and the :class:`Client` it runs.

    Raises:
        StoreError: the client could not connect (the thread is stopped again).
    """

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="taskq-sync-client", daemon=True
        )
        self.thread.start()

        async def connect() -> Client:
            return await Client.connect(settings)

        try:
            self.client = self.run(connect())
        except BaseException:
            self._stop()
            raise

    def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        """Run ``coroutine`` on the loop and wait for its result or its exception."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: nothing left running
            raise

    def close(self, timeout: float | None) -> None:
        try:
            self.run(self.client.stop(timeout))
        finally:
            self._stop()

    def _stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def caller_connection(connection: object) -> Any:
    """The psycopg 3 connection to enqueue on, for what a sync caller passes as
    ``connection=``: a psycopg ``Connection``, or Django's connection (its wrapper,
    or ``django.db.connection``) when Django uses psycopg 3.

    Django's connection is looked up in the calling thread (each thread has its own)
    and opened if it is not yet.

    Raises:
        UnsupportedConnection: anything else (an async connection belongs to its own
            event loop: use the async :class:`~taskq.Client` with it).
    """
    if _is_django(connection):
        connection.ensure_connection()  # type: ignore[attr-defined]
        raw = connection.connection  # type: ignore[attr-defined]
        if _is_psycopg(raw):
            return raw
        raise UnsupportedConnection(
            "connection: Django's database connection is not a psycopg 3 one"
            f" ({type(raw).__module__}.{type(raw).__name__}); taskq enqueues inside a"
            " transaction on PostgreSQL through psycopg 3 (pip install 'psycopg[binary]')"
        )
    if _is_psycopg(connection):
        return connection
    raise UnsupportedConnection(
        f"connection: a {type(connection).__module__}.{type(connection).__name__} is no"
        " connection a SyncClient can enqueue on; pass a psycopg 3 Connection or Django's"
        " connection (an async one belongs to its event loop: use taskq.Client with it)"
    )


def _is_psycopg(connection: object) -> bool:
    """Whether ``connection`` is a sync psycopg 3 connection (psycopg is not imported)."""
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(connection, psycopg.Connection)


def _is_django(connection: object) -> bool:
    """Whether ``connection`` is Django's database connection (a wrapper or its proxy)."""
    return (
        "django" in sys.modules
        and type(connection).__module__.startswith("django.")
        and hasattr(connection, "ensure_connection")
    )


# Clients to close at interpreter exit (their loop threads are daemons).
_open: weakref.WeakSet[SyncClient] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for client in list(_open):
        with contextlib.suppress(Exception):  # what is committed is the relay's to publish
            client.close()
