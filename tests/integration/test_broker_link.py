"""A broker link outlives the broker going away: it reconnects by itself and says so."""

from __future__ import annotations

import asyncio
import logging

import pytest

from taskq.amqp.broker import Link
from taskq.settings import Settings
from tests.support.proxy import proxied

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
