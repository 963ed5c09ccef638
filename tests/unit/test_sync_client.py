"""SyncClient's surface, without services: it mirrors the async Client's methods, and
refuses a connection it cannot enqueue on before it connects anywhere."""

from __future__ import annotations

import inspect

import pytest

from taskq import Client, SyncClient, UnsupportedConnection, load_settings
from taskq.sync_client import caller_connection

# The async client's lifecycle, which SyncClient replaces with close() and its own start.
LIFECYCLE = {"start", "stop", "close"}


def test_every_public_coroutine_method_of_client_has_a_blocking_twin() -> None:
    methods = {
        name
        for name, value in inspect.getmembers(Client, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    missing = sorted(name for name in methods - LIFECYCLE if not hasattr(SyncClient, name))
    assert missing == [], f"add `{missing[0]} = _blocking(Client.{missing[0]})` to SyncClient"


def test_a_blocking_twin_keeps_the_signature_and_the_docstring() -> None:
    for name in ("enqueue", "enqueue_many"):
        twin = getattr(SyncClient, name)
        assert inspect.signature(twin) == inspect.signature(getattr(Client, name))
        assert twin.__doc__ == getattr(Client, name).__doc__


@pytest.mark.parametrize("connection", [object(), "postgresql://localhost/db", 42])
def test_a_connection_taskq_cannot_enqueue_on_is_refused(connection: object) -> None:
    with pytest.raises(UnsupportedConnection, match=r"connection: .* psycopg 3") as raised:
        caller_connection(connection)
    assert isinstance(raised.value, TypeError)


def test_refused_before_connecting() -> None:
    # Nothing answers on port 9: were it to connect first, the error would be a StoreError.
    client = SyncClient(load_settings(database_url="postgresql://postgres@127.0.0.1:9/x"))
    with pytest.raises(UnsupportedConnection):
        client.enqueue("demo.echo", {}, connection=object())
    client.close()
