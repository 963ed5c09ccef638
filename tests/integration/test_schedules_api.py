"""The schedules API on the real Postgres and RabbitMQ: define, list, pause, resume,
trigger, delete; every refusal names its field and changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import (
    JSON,
    assert_problem,
    declare_topology,
    drain,
    put_type,
    running_api,
)

pytestmark = pytest.mark.integration

PAYLOAD_SCHEMA = {
    "type": "object",
    "properties": {"region": {"type": "string"}},
    "required": ["region"],
}


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings, relay=False) as client:
        await put_type(client, "report.v1", payload_schema=PAYLOAD_SCHEMA)
        await put_type(client, "off.v1", enabled=False)
        yield client


def daily(**fields: Any) -> dict[str, Any]:
    return {
        "cron": "30 6 * * *",
        "timezone": "Europe/Paris",
        "type": "report.v1",
        "payload": {"region": "eu"},
        **fields,
    }


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_define_read_replace_and_delete(api: httpx.AsyncClient) -> None:
    created = await api.put("/schedules/daily-report", json=daily())
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "daily-report"
    assert (body["cron"], body["timezone"], body["every"]) == ("30 6 * * *", "Europe/Paris", None)
    assert (body["catch_up"], body["catch_up_limit"], body["overlap"]) == ("once", 100, "allow")
    assert (body["paused"], body["source"], body["fires"]) == (False, "api", 0)
    fires = [at(t) for t in body["upcoming"]]
    assert fires[0] == at(body["next_fire_at"])
    assert len(fires) == 3
    assert fires[0] > datetime.now(UTC)
    for fire in fires:  # 06:30 in Paris: 05:30 UTC in winter, 04:30 in summer
        assert fire.astimezone(UTC).strftime("%M") == "30"
        assert fire.astimezone(UTC).hour in (4, 5)

    # The same timing again keeps the next fire; other fields change.
    replaced = await api.put("/schedules/daily-report", json=daily(payload={"region": "us"}))
    assert replaced.status_code == 200
    assert replaced.json()["next_fire_at"] == body["next_fire_at"]
    assert replaced.json()["payload"] == {"region": "us"}

    every = await api.put(
        "/schedules/pulse", json={"every": "30s", "type": "report.v1", "payload": {"region": "eu"}}
    )
    assert every.status_code == 201, every.text
    assert every.json()["every"] == 30.0
    assert at(every.json()["next_fire_at"]).timestamp() % 30 == 0

    listed = (await api.get("/schedules")).json()
    assert [s["name"] for s in listed["schedules"]] == ["daily-report", "pulse"]
    assert listed["next_after"] is None
    first = (await api.get("/schedules", params={"limit": 1})).json()
    assert [s["name"] for s in first["schedules"]] == ["daily-report"]
    second = (await api.get("/schedules", params={"after": first["next_after"]})).json()
    assert [s["name"] for s in second["schedules"]] == ["pulse"]

    assert (await api.get("/schedules/pulse")).json()["name"] == "pulse"
    deleted = await api.delete("/schedules/pulse", headers=JSON)
    assert deleted.json() == {"deleted": "pulse"}
    assert (await api.get("/schedules/pulse")).status_code == 404
    assert (await api.delete("/schedules/pulse", headers=JSON)).status_code == 404


async def test_pause_resume_and_trigger(
    api: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    await api.put("/schedules/daily-report", json=daily())
    paused = await api.post("/schedules/daily-report/pause", json={})
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused"] is True
    assert paused.json()["next_fire_at"] is None
    assert paused.json()["upcoming"] == []

    triggered = await api.post("/schedules/daily-report/trigger", json={})
    assert triggered.status_code == 201, triggered.text
    task_id = triggered.json()["task_id"]
    [envelope] = await drain(settings, "default", expect=1)
    assert envelope.message_id == task_id
    task = (await api.get(f"/tasks/{task_id}")).json()
    assert (task["type"], task["payload"]) == ("report.v1", {"region": "eu"})
    after = (await api.get("/schedules/daily-report")).json()
    assert (after["fires"], after["last_task_id"], after["paused"]) == (1, task_id, True)

    # A resume takes the first fire after now.
    await db.execute("UPDATE schedules SET next_fire_at = now() - interval '3 days'")
    resumed = await api.post("/schedules/daily-report/resume", json={})
    assert resumed.status_code == 200, resumed.text
    assert at(resumed.json()["next_fire_at"]) > datetime.now(UTC)
    for route in ("pause", "resume", "trigger"):
        missing = await api.post(f"/schedules/nothing/{route}", json={})
        assert_problem(missing, 404)


async def test_trigger_of_a_disabled_type_is_a_conflict(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await api.put("/schedules/daily-report", json=daily())
    await db.execute("UPDATE task_type SET enabled = false WHERE name = 'report.v1'")
    response = await api.post("/schedules/daily-report/trigger", json={})
    assert_problem(response, 409)
    assert "unknown or disabled" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "report.v1", "payload": {"region": "eu"}}, "cron"),  # neither cron nor every
        (daily(every=60), "cron"),  # both
        (daily(cron="61 * * * *"), "cron"),
        (daily(cron="0 0 30 2 *"), "cron"),
        (daily(timezone="Mars/Olympus"), "timezone"),
        (daily(cron=None, every="0.5s"), "every"),
        (daily(cron=None, every="soon"), "every"),
        (daily(cron=None, every=True), "every"),
        (daily(type="nope.v1"), "type"),
        (daily(type="off.v1"), "type"),
        (daily(queue="nowhere"), "queue"),
        (daily(payload={"region": 5}), "payload.region"),
        (daily(payload={}), "payload"),
        (daily(payload=[1]), "payload"),
        (daily(catch_up="sometimes"), "catch_up"),
        (daily(catch_up_limit=0), "catch_up_limit"),
        (daily(overlap="maybe"), "overlap"),
        (daily(colour="blue"), "colour"),
        ([], "body"),
    ],
)
async def test_refusals_name_the_field_and_change_nothing(
    api: httpx.AsyncClient, body: Any, field: str
) -> None:
    response = await api.put("/schedules/daily-report", json=body)
    assert_problem(response, 400)
    assert response.json()["field"].startswith(field), response.json()
    assert (await api.get("/schedules")).json()["schedules"] == []


async def test_bad_names_limits_and_media_types(api: httpx.AsyncClient) -> None:
    assert_problem(await api.put("/schedules/-bad", json=daily()), 400)
    assert_problem(await api.put("/schedules/" + "x" * 201, json=daily()), 400)
    assert_problem(await api.get("/schedules/-bad"), 404)
    assert_problem(await api.get("/schedules", params={"limit": "0"}), 400)
    assert_problem(await api.get("/schedules", params={"limit": "99999"}), 400)
    assert_problem(await api.get("/schedules", params={"after": "../x"}), 400)
    plain = await api.put(
        "/schedules/daily-report", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert_problem(plain, 415)
    assert_problem(await api.post("/schedules/daily-report/pause", content=b""), 415)
    assert (await api.get("/schedules")).json()["schedules"] == []


async def test_the_number_of_schedules_is_capped(settings: Settings) -> None:
    await declare_topology(settings)
    capped = settings.model_copy(update={"max_schedules": 2})
    async with running_api(capped, relay=False) as api:
        await put_type(api, "report.v1")
        for name in ("a", "b"):
            response = await api.put(f"/schedules/{name}", json={"every": 60, "type": "report.v1"})
            assert response.status_code == 201, response.text
        full = await api.put("/schedules/c", json={"every": 60, "type": "report.v1"})
        assert_problem(full, 409)
        assert "TASKQ_MAX_SCHEDULES" in full.json()["detail"]
        # Replacing one that exists is no new schedule.
        again = await api.put("/schedules/a", json={"every": 120, "type": "report.v1"})
        assert again.status_code == 200
