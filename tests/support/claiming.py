"""A claimer wired to a test's fakes (tests/unit/test_claims.py, tests/unit/test_inline.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from taskq.metrics import WorkerMetrics
from taskq.model import ClaimedTask
from taskq.worker.claims import Claimer
from taskq.worker.consumer import Buffers
from taskq.worker.inline import Inline


def fake_claimer(
    store: object,
    publisher: object,
    buffers: Buffers,
    acker: object,
    begin: Callable[[ClaimedTask], object],
    inline: Inline | None = None,
) -> Claimer:
    """A claimer of worker ``w1`` (lease 30 s, 10 slots) on fakes of its parts."""
    return Claimer(
        cast(Any, store),
        cast(Any, publisher),
        buffers,
        cast(Any, acker),
        begin=begin,
        metrics=WorkerMetrics(),
        worker_id="w1",
        lease=30.0,
        concurrency=10,
        inline=inline,
    )
