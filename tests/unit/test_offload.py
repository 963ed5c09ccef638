"""taskq.enqueue.offload: checks run in threads with a deadline; an overrun is interrupted."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from taskq.enqueue.offload import Busy, Offload, Overrun


def spin() -> None:
    while True:
        pass


async def test_results_errors_and_an_interrupted_overrun() -> None:
    offload = Offload(threads=2)
    try:
        assert await offload.run(1.0, lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await offload.run(1.0, lambda: 1 / 0)

        # Two runaway jobs hold both threads; the loop keeps its pace meanwhile.
        lags: list[float] = []

        async def tick() -> None:
            for _ in range(20):
                started = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - started - 0.01)

        spins = [offload.run(0.5, spin), offload.run(0.5, spin)]
        queued = offload.run(0.2, lambda: "never")
        results = await asyncio.gather(*spins, queued, tick(), return_exceptions=True)
        assert [type(r) for r in results[:3]] == [Overrun, Overrun, Busy]
        assert sorted(lags)[len(lags) // 2] < 0.1, lags

        # The interrupted threads were replaced: the pool works, and nothing spins on.
        assert await offload.run(1.0, lambda: "again") == "again"
        assert offload.interrupted == 2
        deadline = time.monotonic() + 10
        while sum(t.name == "taskq-check" for t in threading.enumerate()) > 2:
            assert time.monotonic() < deadline, "an interrupted thread did not end"
            await asyncio.sleep(0.05)
    finally:
        offload.close()
