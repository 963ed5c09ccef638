"""The NOTIFY channels of an install (named after its schema), and the dedicated
connections that LISTEN on them.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from taskq.errors import StoreError
from taskq.store._connect import open_connection
from taskq.store._errors import _DOWN


def notify_channel(schema: str) -> str:
    """The channel that wakes the relay of the install in ``schema``: ``taskq_enqueued``
    for the default schema, so that each install in a database hears only its own."""
    return f"{schema}_enqueued"


def finished_channel(schema: str) -> str:
    """The channel on which tasks somebody waits for announce their end (their id is
    the payload): ``taskq_finished`` for the default schema (migration 0008's trigger)."""
    return f"{schema}_finished"


def queues_channel(schema: str) -> str:
    """The channel on which pauses and resumes of work queues wake the workers (the
    queue's name is the payload): ``taskq_queues`` for the default schema."""
    return f"{schema}_queues"


async def listen(
    url: str,
    channel: str,
    on_notify: Callable[[str], None],
    on_lost: Callable[[], None],
    *,
    name: str,
) -> asyncpg.Connection:
    """A dedicated connection that LISTENs on ``channel``: ``on_notify(payload)`` for
    each notification, ``on_lost()`` once the connection is gone.

    Raises:
        StoreError: the database cannot be reached.
    """
    try:
        connection = await open_connection(
            url, timeout=5, server_settings={"application_name": name[:63]}
        )
    except _DOWN as exc:
        raise StoreError(f"cannot connect to the database: {exc}") from exc

    def notified(conn: object, pid: int, channel: str, payload: str) -> None:
        on_notify(payload)

    try:
        connection.add_termination_listener(lambda conn: on_lost())
        await connection.add_listener(channel, notified)
    except BaseException as exc:
        connection.terminate()
        if isinstance(exc, _DOWN):
            raise StoreError(f"cannot listen for notifications: {exc}") from exc
        raise
    return connection
