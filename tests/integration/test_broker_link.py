"""A broker link outlives the broker going away: it reconnects by itself and says so."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from taskq.amqp.broker import Link
from taskq.settings import Settings
from tests.support.proxy import proxied
from tests.support.services import free_port

pytestmark = pytest.mark.integration


async def test_a_link_reconnects_after_the_broker_went_away_and_logs_it(
    amqp_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, through = await proxied(amqp_settings, "broker")
    link = Link(through.amqp_url, name="test-link")
    caplog.set_level(logging.INFO, logger="taskq.broker")
    try:
        await link.start()
        await asyncio.wait_for(link.ready.wait(), 10)
        assert link.available
        await proxy.cut()
        for _ in range(100):
            if not link.available:
                break
            await asyncio.sleep(0.05)
        assert not link.available
        await proxy.start()
        for _ in range(200):
            if link.available:
                break
            await asyncio.sleep(0.05)
        assert link.available, "the link did not reconnect"
        channel = await link.connection().channel()  # and it works
        await channel.close()
    finally:
        await link.stop()
        await proxy.cut()
    messages = [r.getMessage() for r in caplog.records if r.name == "taskq.broker"]
    assert any(m.startswith("test-link: lost the broker connection") for m in messages), messages
    assert "test-link: reconnected to the broker" in messages
    # Closing the link is not a loss.
    assert sum("lost the broker connection" in m for m in messages) == 1


async def wait_until(check: Callable[[], bool], seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


async def test_a_link_to_several_nodes_connects_past_one_that_is_down(
    amqp_settings: Settings,
) -> None:
    """The nodes are tried in turn from a random one: with one of two down, every
    link still connects, wherever it started."""
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    for _ in range(4):
        link = Link([dead, amqp_settings.amqp_url], name="test-two-nodes")
        try:
            await link.start()
            await asyncio.wait_for(link.ready.wait(), 10)
            assert link.available
        finally:
            await link.stop()


async def test_a_link_that_loses_its_node_reconnects_to_the_next(
    amqp_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Two proxies stand for two nodes of one cluster; the one in use is cut and stays
    cut: the link moves to the other and says where it went."""
    first, one = await proxied(amqp_settings, "broker")
    second, other = await proxied(amqp_settings, "broker")
    link = Link([one.amqp_url, other.amqp_url], name="test-failover")
    caplog.set_level(logging.INFO, logger="taskq.broker")
    try:
        await link.start()
        await asyncio.wait_for(link.ready.wait(), 10)
        used, spare = (first, second) if first._writers else (second, first)
        assert used._writers and not spare._writers
        await used.cut()
        assert await wait_until(lambda: not link.available, 5)
        assert await wait_until(lambda: link.available, 15), "the link did not move"
        assert spare._writers, "the link reconnected elsewhere than the other node"
        channel = await link.connection().channel()
        await channel.close()
    finally:
        await link.stop()
        await first.cut()
        await second.cut()
    messages = [r.getMessage() for r in caplog.records if r.name == "taskq.broker"]
    assert f"test-failover: reconnected to the broker at 127.0.0.1:{spare.port}" in messages
