"""Failover's pure logic: which URLs are tried host by host at once, and which
driver errors make the store retire a connection (and the pool's others)."""

from __future__ import annotations

import asyncpg
import pytest

from taskq.store import connection_lost as lost
from taskq.store import writable_hosts

TWO = "postgresql://u:p%40w@db1:5432,db2:5433/taskq"


def test_a_url_of_several_hosts_asking_for_the_writable_one_is_split_per_host() -> None:
    assert writable_hosts(TWO + "?target_session_attrs=read-write&sslmode=disable") == [
        "postgresql://u:p%40w@db1:5432/taskq?target_session_attrs=read-write&sslmode=disable",
        "postgresql://u:p%40w@db2:5433/taskq?target_session_attrs=read-write&sslmode=disable",
    ]
    assert writable_hosts("postgres://a,b:6/d?target_session_attrs=primary") == [
        "postgres://a/d?target_session_attrs=primary",
        "postgres://b:6/d?target_session_attrs=primary",
    ]
    assert writable_hosts("postgresql://u@[::1]:5,[::2]:6/d?target_session_attrs=read-write") == [
        "postgresql://u@[::1]:5/d?target_session_attrs=read-write",
        "postgresql://u@[::2]:6/d?target_session_attrs=read-write",
    ]


@pytest.mark.parametrize(
    "url",
    [
        TWO,  # no target_session_attrs: any host, in the URL's order
        TWO + "?target_session_attrs=any",
        TWO + "?target_session_attrs=prefer-standby",  # an order of preference
        TWO + "?target_session_attrs=read-only",  # several may qualify
        "postgresql://u@db1:5432/taskq?target_session_attrs=read-write",  # one host
    ],
)
def test_other_urls_are_left_to_asyncpg(url: str) -> None:
    assert writable_hosts(url) is None


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),  # a statement timeout: the server may be frozen
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InternalClientError("cannot switch to state 15"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    ],
    ids=type,
)
def test_errors_of_a_connection_gone_or_on_the_wrong_server_are_lost(error: Exception) -> None:
    assert lost(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.DiskFullError("could not extend file"),
    ],
    ids=type,
)
def test_errors_the_server_answered_leave_the_connection_good(error: Exception) -> None:
    assert not lost(error)
