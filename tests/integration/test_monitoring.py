"""Monitoring: the broker's queue depths in the API's /metrics, while the broker is up
and once it is gone."""

from __future__ import annotations

import asyncio

import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology, put_type, running_api
from tests.support.metrics import samples
from tests.support.proxy import proxied


@pytest.mark.integration
async def test_metrics_show_queue_depths_and_drop_them_when_the_broker_is_gone(
    settings: Settings,
) -> None:
    await declare_topology(settings)
    proxy, through = await proxied(settings, "broker")
    through = through.model_copy(update={"api_keys": ["sesame"]})
    names = settings.topology().names
    try:
        async with running_api(through, relay=False) as api:
            # Prometheus scrapes without credentials: /metrics stays open when keys are set.
            assert (await api.get("/metrics")).status_code == 200
            assert (await api.get("/types")).status_code == 401
            api.headers["Authorization"] = "Bearer sesame"
            await put_type(api, "demo.echo")
            for _ in range(3):
                response = await api.post("/enqueue", json={"type": "demo.echo", "payload": {}})
                assert response.status_code == 201, response.text
            # The envelopes are published after the answers, in the background.
            default = (("kind", "work"), ("queue", names.queue("default")))
            for _ in range(100):
                text = (await api.get("/metrics")).text
                messages = samples(text, "taskq_queue_messages")
                if messages[default] == 3:
                    break
                await asyncio.sleep(0.05)
            assert messages[default] == 3
            assert messages[(("kind", "work"), ("queue", names.queue("high")))] == 0
            assert messages[(("kind", "dlq"), ("queue", names.dlq))] == 0
            assert (("kind", "delay"), ("queue", names.delay(0))) in messages
            consumers = samples(text, "taskq_queue_consumers")
            assert consumers[(("kind", "work"), ("queue", names.queue("default")))] == 0
            assert samples(text, "taskq_broker_up") == {(): 1.0}

            await proxy.cut()
            for _ in range(100):
                response = await api.get("/metrics")
                if samples(response.text, "taskq_broker_up") == {(): 0.0}:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 200
            assert samples(response.text, "taskq_broker_up") == {(): 0.0}
            assert samples(response.text, "taskq_queue_messages") == {}
    finally:
        await proxy.cut()  # idempotent: also when an assertion failed first
