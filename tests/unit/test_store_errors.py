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
    wrapped = await store_error(error)
    assert not isinstance(wrapped, RejectedByDatabase)
    assert wrapped.__cause__ is error


async def store_error(error: Exception) -> StoreError:
    """What the store raises when a statement fails with ``error``."""
    store = Store(cast(Any, None))
    with pytest.raises(StoreError) as raised:
        async with store._connection(cast(Any, object())):
            raise error
    return raised.value


async def test_data_the_database_refuses_is_not_an_outage() -> None:
    assert isinstance(
        await store_error(asyncpg.UniqueViolationError("duplicate key")), RejectedByDatabase
    )


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.ProgramLimitExceededError(
            "total size of jsonb object elements exceeds the maximum"
        ),
        asyncpg.exceptions.StringDataRightTruncationError("value too long for type"),
        asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence"),
        asyncpg.exceptions.NumericValueOutOfRangeError("value out of range"),
        asyncpg.CardinalityViolationError("more than one row returned by a subquery"),
        asyncpg.exceptions.WithCheckOptionViolationError("new row violates check option"),
        asyncpg.CheckViolationError("violates check constraint"),
    ],
    ids=type,
)
async def test_data_that_can_never_be_stored_is_refused(error: Exception) -> None:
    # The outcome recorder retries a StoreError until it passes; these never would.
    wrapped = await store_error(error)
    assert isinstance(wrapped, RejectedByDatabase) and wrapped.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.exceptions.DiskFullError("could not extend file"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
    ],
    ids=type,
)
async def test_errors_that_may_pass_are_not_refusals(error: Exception) -> None:
    assert not isinstance(await store_error(error), RejectedByDatabase)
