"""The outcome recorder never holds a lease for ever: an outcome it cannot write is given up."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest

from taskq import outcomes
from taskq.errors import StoreError
from taskq.metrics import WorkerMetrics
from taskq.outcomes import Finished, Recorder

from .worker_fixtures import poll


class Failing:
    """A store whose outcome statements all fail as if the database were away."""

    def __init__(self) -> None:
        self.tries = 0

    async def complete(self, items: Any) -> Any:
        self.tries += 1
        raise StoreError("database error: connection refused")


async def test_an_outcome_that_cannot_be_written_is_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outcomes, "GIVE_UP_SECONDS", 0.5)
    monkeypatch.setattr(outcomes, "RETRY_SECONDS", 0.05)
    store, settled = Failing(), []
    recorder = Recorder(cast(Any, store), cast(Any, None), WorkerMetrics(), settled.append)
    await recorder.start()
    try:
        token = uuid.uuid4()
        recorder.add(Finished("complete", uuid.uuid4(), token, 1, "t", "default", result="null"))
        # Retried while the heartbeat keeps the lease; then settled, so the heartbeat
        # lets the lease run out and the sweeper takes the task back.
        await poll(lambda: settled == [token], "the outcome was never given up")
        assert store.tries > 1
        tries = store.tries
        await poll(lambda: recorder._idle.is_set(), "the recorder kept the outcome")
        assert store.tries == tries
    finally:
        await recorder.stop(1.0)
