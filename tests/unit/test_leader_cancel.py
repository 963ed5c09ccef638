"""The leader loop (taskq.fleet.leader.lead) ends when it is cancelled, even if a step
swallowed the cancellation.

The intermittent hang of the integration suite: a worker's stop waited for ever for
its sweeper, whose loop had been cancelled in the middle of a pass: the depth read,
cancelled while it opened its channel, returned as usual, and the loop slept until
its next pass, and the next.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from taskq.fleet.leader import SessionLock, lead
from taskq.service import raise_if_cancelled


class HeldLock(SessionLock):
    """A lock that this process always holds (no database)."""

    def __init__(self) -> None:
        super().__init__("postgresql://unused", 1, "test")

    async def hold(self) -> bool:
        return True


async def ended(task: asyncio.Task[None]) -> bool:
    """Whether ``task`` ends once nothing else runs (it has nothing to wait for but a
    pass's interval of an hour)."""
    done, _ = await asyncio.wait([task], timeout=5)
    return bool(done)


async def test_a_cancellation_a_pass_swallows_still_ends_the_loop() -> None:
    in_pass = asyncio.Event()

    async def swallowing_pass() -> None:
        # What a library call did: the cancellation arrives, and the call returns.
        in_pass.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    task = asyncio.create_task(lead(HeldLock(), swallowing_pass, interval=3600))
    await in_pass.wait()
    task.cancel()
    assert await ended(task)
    assert task.cancelled()


async def test_a_cancellation_as_the_wake_comes_still_ends_the_loop() -> None:
    """Python 3.11's asyncio.wait_for returns the awaited result when it is cancelled
    as that result comes: the wake's, here."""
    passes = 0
    passed = asyncio.Event()
    wake = asyncio.Event()

    async def counting_pass() -> None:
        nonlocal passes
        passes += 1
        passed.set()

    task = asyncio.create_task(lead(HeldLock(), counting_pass, interval=3600, wake=wake))
    await passed.wait()
    await asyncio.sleep(0)  # the loop waits for its wake now
    wake.set()
    task.cancel()
    assert await ended(task)
    assert task.cancelled()
    assert passes == 1


async def test_raise_if_cancelled_raises_only_while_a_cancellation_is_pending() -> None:
    async def check() -> str:
        raise_if_cancelled()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)  # swallowed: still pending on the task
        raise_if_cancelled()
        return "not reached"

    task = asyncio.create_task(check())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
