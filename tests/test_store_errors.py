"""The store turns every driver error of a database going away into a StoreError (HTTP 503)."""

from __future__ import annotations

from typing import Any, cast

import asyncpg
import pytest

from taskq.errors import RejectedByDatabase, StoreError
from taskq.store import Store

# What asyncpg raised on the API's next statement on a connection that Postgres
# dropped mid-statement, when Postgres was stopped under load (fault scenario 3).
STATE_ERROR = "cannot switch to state 15; another operation (2) is in progress"


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InternalClientError(STATE_ERROR),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
    ids=type,
)
async def test_a_database_going_away_is_a_store_error(error: Exception) -> None:
    store = Store(cast(Any, None))
    with pytest.raises(StoreError) as raised:
        async with store._connection(cast(Any, object())):
            raise error
    assert not isinstance(raised.value, RejectedByDatabase)
    assert raised.value.__cause__ is error


async def test_data_the_database_refuses_is_not_an_outage() -> None:
    store = Store(cast(Any, None))
    with pytest.raises(RejectedByDatabase):
        async with store._connection(cast(Any, object())):
            raise asyncpg.UniqueViolationError("duplicate key")
