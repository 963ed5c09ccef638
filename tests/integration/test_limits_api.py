"""The rate limiters API (taskq.web.limits) and rate_limit on task types, through HTTP:
every answer, every refusal, and nothing changed by a refused request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from taskq.settings import Settings
from taskq.store import NewTask
from tests.support.api_fixtures import assert_problem, declare_topology, put_type, running_api
from tests.support.worker_fixtures import harness

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings) as client:
        await put_type(client, "demo.echo")
        yield client


async def test_a_limiter_is_created_read_replaced_and_deleted(api: httpx.AsyncClient) -> None:
    response = await api.put("/limits/stripe", json={"limit": 100, "per": "1m", "key": "cust"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["limit"], body["per"], body["burst"], body["key"]) == (
        "stripe", 100, 60.0, 1, "cust",
    )  # fmt: skip
    assert body["types"] == [] and body["type"] is None
    response = await api.put("/limits/stripe", json={"limit": 5, "per": 1, "burst": 5})
    assert response.status_code == 200 and response.json()["key"] is None
    assert (await api.get("/limits/stripe")).json()["limit"] == 5
    assert [r["name"] for r in (await api.get("/limits")).json()["limits"]] == ["stripe"]
    assert (
        await api.delete("/limits/stripe", headers={"content-type": "application/json"})
    ).json() == {"deleted": "stripe"}
    assert_problem(await api.get("/limits/stripe"), 404)
    assert_problem(
        await api.delete("/limits/stripe", headers={"content-type": "application/json"}), 404
    )


async def test_bad_limiters_are_refused_and_change_nothing(api: httpx.AsyncClient) -> None:
    for body, field in [
        ({"limit": 0, "per": 1}, "limit"),
        ({"limit": 1.5, "per": 1}, "limit"),
        ({"limit": 10, "per": "soon"}, "per"),
        ({"limit": 10, "per": 0}, "per"),
        ({"limit": 10, "per": "60d"}, "per"),
        ({"limit": 10, "per": 1, "burst": 11}, "burst"),
        ({"limit": 10, "per": 1, "key": "a b"}, "key"),
        ({"limit": 10, "per": 1, "colour": 1}, "colour"),
        ({"per": 1}, "limit"),
        ([], "body"),
    ]:
        assert_problem(await api.put("/limits/ok", json=body), 400, field)
    assert_problem(
        await api.put("/limits/type:demo.echo", json={"limit": 1, "per": 1}), 400, "name"
    )
    assert (await api.get("/limits")).json() == {"limits": []}


async def test_a_type_takes_a_limit_of_its_own_or_a_limiters_name(api: httpx.AsyncClient) -> None:
    response = await api.put("/types/demo.echo", json={"rate_limit": {"limit": 100, "per": "1m"}})
    assert response.status_code == 200, response.text
    limit = {"limit": 100, "per": 60.0, "burst": 1, "key": None}
    assert response.json()["rate_limit"] == limit
    assert response.json()["rate_limit_source"] == "api"
    assert (await api.get("/types/demo.echo")).json()["rate_limit"] == limit
    (own,) = (await api.get("/limits")).json()["limits"]
    assert own["name"] == "type:demo.echo" and own["type"] == "demo.echo"
    assert own["types"] == ["demo.echo"]
    # A type's own limiter changes only through its type.
    assert_problem(
        await api.delete("/limits/type:demo.echo", headers={"content-type": "application/json"}),
        409,
    )
    # Omitted: unchanged.
    response = await api.put("/types/demo.echo", json={"max_attempts": 3})
    assert response.json()["rate_limit"] == limit
    # A shared limiter, by name; the type's own is deleted with its last use.
    assert (await api.put("/limits/shared", json={"limit": 2, "per": 1})).status_code == 201
    response = await api.put("/types/demo.echo", json={"rate_limit": "shared"})
    assert response.json()["rate_limit"] == "shared"
    assert [r["name"] for r in (await api.get("/limits")).json()["limits"]] == ["shared"]
    assert (await api.get("/limits/shared")).json()["types"] == ["demo.echo"]
    deleting = await api.delete("/limits/shared", headers={"content-type": "application/json"})
    assert_problem(deleting, 409)
    assert "demo.echo" in deleting.json()["detail"]
    response = await api.put("/types/demo.echo", json={"rate_limit": None})
    assert response.json()["rate_limit"] is None and response.json()["rate_limit_source"] is None
    assert (
        await api.delete("/limits/shared", headers={"content-type": "application/json"})
    ).status_code == 200


async def test_a_bad_rate_limit_on_a_type_changes_nothing(api: httpx.AsyncClient) -> None:
    for body, field in [
        ({"rate_limit": "nobody", "max_attempts": 9}, "rate_limit"),
        ({"rate_limit": "bad name", "max_attempts": 9}, "rate_limit"),
        ({"rate_limit": {"limit": 0, "per": 1}, "max_attempts": 9}, "rate_limit.limit"),
        ({"rate_limit": {"limit": 1}, "max_attempts": 9}, "rate_limit.per"),
        ({"rate_limit": 12, "max_attempts": 9}, "rate_limit"),
    ]:
        assert_problem(await api.put("/types/demo.echo", json=body), 400, field)
    found = (await api.get("/types/demo.echo")).json()
    assert found["max_attempts"] != 9 and found["rate_limit"] is None
    assert (await api.get("/limits")).json() == {"limits": []}


async def test_a_waiting_task_says_which_limit_it_waits_for(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.put("/types/demo.echo", json={"rate_limit": {"limit": 1, "per": "1h"}})
    async with harness(settings) as h:
        ids = [uuid.uuid4(), uuid.uuid4()]
        await h.store.enqueue([NewTask(i, "demo.echo", "{}") for i in ids])
        await h.store.claim(ids, "w1", 30.0)
    bodies = [(await api.get(f"/tasks/{i}")).json() for i in ids]
    waiting = [b for b in bodies if b["status"] == "ENQUEUED"]
    assert len(waiting) == 1
    assert waiting[0]["limited_by"] == "type:demo.echo"
    # Its slot (an hour away) is past the hold window: it waits without one until
    # then (run_at), then takes the next one.
    assert waiting[0]["limited_until"] is None and waiting[0]["attempts"] == 0
    assert waiting[0]["run_at"] > bodies[0]["created_at"]
    listed = (await api.get("/tasks", params={"status": "ENQUEUED"})).json()
    assert "limited_by" not in listed["tasks"][0]
