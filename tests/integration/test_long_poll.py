"""``GET /tasks/{id}?wait=``: answered once the task ends, or as it is at the timeout;
bad ``wait`` values and a full waiter list are clear errors."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import JSON, assert_problem, put_type, running_api
from tests.support.worker_fixtures import poll

pytestmark = pytest.mark.integration


async def scheduled_task(api: httpx.AsyncClient) -> str:
    await put_type(api, "poll.v1")
    response = await api.post("/enqueue", json={"type": "poll.v1", "payload": {}, "delay": 3600})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def waiting(api: httpx.AsyncClient) -> int:
    return int(api.app.state.client.waiters.waiting)  # type: ignore[attr-defined]


async def test_a_long_poll_answers_when_the_task_ends(settings: Settings) -> None:
    async with running_api(settings, relay=False) as api:
        task_id = await scheduled_task(api)
        polling = asyncio.create_task(api.get(f"/tasks/{task_id}", params={"wait": "30"}))
        await poll(lambda: waiting(api) == 1, "the long-poll did not start")
        assert not polling.done()
        cancelled = await api.post(f"/tasks/{task_id}/cancel", json={"reason": "done with it"})
        assert cancelled.status_code == 200, cancelled.text
        response = await asyncio.wait_for(polling, 20)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "CANCELLED"
        # Ended already: answered at once.
        again = await api.get(f"/tasks/{task_id}", params={"wait": "30"})
        assert again.json()["status"] == "CANCELLED"


async def test_a_long_poll_answers_the_task_as_it_is_at_the_timeout(settings: Settings) -> None:
    async with running_api(settings, relay=False) as api:
        task_id = await scheduled_task(api)
        response = await api.get(f"/tasks/{task_id}", params={"wait": "0.5"})
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["progress"]) == ("ENQUEUED", None)
        assert waiting(api) == 0
        # wait=0 reads the task without waiting.
        assert (await api.get(f"/tasks/{task_id}?wait=0")).json()["status"] == "ENQUEUED"


@pytest.mark.parametrize(
    "query",
    [
        "wait=abc",
        "wait=-1",
        "wait=nan",
        "wait=inf",
        "wait=1e999",
        "wait=61",
        "wait=",
        "wait=1&wait=2",
        "wait=" + "0" * 32 + "1",
    ],
)
async def test_bad_waits_are_400_naming_the_field(settings: Settings, query: str) -> None:
    async with running_api(settings, relay=False) as api:
        task_id = await scheduled_task(api)
        response = await api.get(f"/tasks/{task_id}?{query}")
        assert_problem(response, 400, "wait")
        assert waiting(api) == 0


async def test_any_float_s_shortest_text_is_a_wait(settings: Settings) -> None:
    # 22 characters: schemathesis sends such numbers, which the document allows.
    async with running_api(settings, relay=False) as api:
        task_id = await scheduled_task(api)
        response = await api.get(f"/tasks/{task_id}?wait=8.000677625708353e-289")
        assert response.status_code == 200, response.text


async def test_an_unknown_task_is_404_with_a_wait(settings: Settings) -> None:
    async with running_api(settings, relay=False) as api:
        response = await api.get(f"/tasks/{uuid.uuid4()}", params={"wait": "5"})
        assert_problem(response, 404)


async def test_long_polls_beyond_the_limit_get_503(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_waiters": 1})
    async with running_api(settings, relay=False) as api:
        task_id = await scheduled_task(api)
        first = asyncio.create_task(api.get(f"/tasks/{task_id}", params={"wait": "30"}))
        await poll(lambda: waiting(api) == 1, "the long-poll did not start")
        refused = await api.get(f"/tasks/{task_id}", params={"wait": "5"})
        assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "1"
        await api.post(f"/tasks/{task_id}/cancel", headers=JSON)
        assert (await asyncio.wait_for(first, 20)).json()["status"] == "CANCELLED"


async def test_the_wait_parameter_is_in_the_openapi_document(settings: Settings) -> None:
    async with running_api(settings, relay=False) as api:
        document = (await api.get("/openapi.json")).json()
    operation = document["paths"]["/tasks/{id}"]["get"]
    [wait] = [p for p in operation["parameters"] if p["name"] == "wait"]
    assert wait["in"] == "query" and wait["schema"]["maximum"] == settings.max_wait
    assert {"400", "503"} <= set(operation["responses"])
    assert "progress" in document["components"]["schemas"]["Task"]["properties"]
