"""The dashboard at /ui in headless Chromium, against real API and worker processes.

Each test drives the page as an operator would and checks the outcome both on
screen and through the API. Screenshots go to ``$TASKQ_ARTIFACTS`` (default
``test-artifacts/``).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.support.browser_fixtures import API_KEY, System, artifacts_dir, browser, page, system

pytestmark = [pytest.mark.integration, pytest.mark.browser]
__all__ = ["browser", "page", "system"]  # fixtures, imported to be found

try:
    from playwright.sync_api import expect
except ImportError:  # the fixtures skip (or fail under CI) with the reason
    expect = None  # type: ignore[assignment]


def row(page: Any, table: str, task_id: str) -> Any:
    return page.locator(f'{table} tbody tr[data-id="{task_id}"]')


def confirm(page: Any) -> None:
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("#confirm-ok").click()
    expect(dialog).to_be_hidden()


def test_ui_is_served_without_a_key_and_data_needs_one(system: System) -> None:
    index = httpx.get(system.keyed_url + "/ui/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert httpx.get(system.keyed_url + "/ui", follow_redirects=False).status_code in (307, 308)
    script = httpx.get(system.keyed_url + "/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(system.keyed_url + "/ui/nope.js").status_code == 404
    assert httpx.get(system.keyed_url + "/stats").status_code == 401


def test_an_enqueued_task_appears_live_and_its_timeline_opens(system: System, page: Any) -> None:
    page.goto(system.url + "/ui/#/tasks")
    expect(page.locator("#live")).to_have_text("Live")
    task = system.enqueue("demo.echo", {"hello": "browser"})
    line = row(page, "#tasks-table", task["id"])
    expect(line).to_be_visible()  # arrived through the stream, no reload
    expect(line.locator(".badge").first).to_have_text("succeeded")

    line.locator("a").click()
    expect(page.locator("#task-id")).to_have_text(task["id"])
    expect(page.locator("#task-status")).to_have_text("succeeded")
    timeline = page.locator("#timeline li")
    expect(timeline).to_have_count(len(system.events(task["id"])))
    expect(timeline.first.locator(".badge")).to_have_text("enqueued")
    expect(timeline.last.locator(".badge")).to_have_text("succeeded")
    expect(page.locator("#task-payload")).to_contain_text('"hello": "browser"')
    expect(page.locator("#task-result")).to_contain_text('"hello": "browser"')
    expect(page.locator("#task-cancel")).to_be_hidden()

    # The search box finds a task by id; an unknown id says so.
    page.goto(system.url + "/ui/#/")
    page.fill("#find-id", task["id"])
    page.press("#find-id", "Enter")
    expect(page.locator("#task-id")).to_have_text(task["id"])
    page.fill("#find-id", "00000000-0000-4000-8000-000000000000")
    page.press("#find-id", "Enter")
    expect(page.locator("#task-missing")).to_be_visible()


def test_the_inspector_shows_a_running_tasks_progress_live(system: System, page: Any) -> None:
    task = system.enqueue("demo.sleep", {"seconds": 6})
    page.goto(system.url + f"/ui/#/task/{task['id']}")
    expect(page.locator("#task-id")).to_have_text(task["id"])
    progress = page.locator("#task-progress")
    expect(progress).to_be_visible(timeout=20_000)
    expect(page.locator("#task-progress-details")).to_contain_text("left: ")
    first = page.locator("#task-progress-text").text_content()
    # Later reports arrive through the stream, without a reload; the last one stays.
    expect(page.locator("#task-progress-text")).not_to_have_text(first or "", timeout=20_000)
    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=20_000)
    expect(page.locator("#task-progress-text")).to_contain_text("100%", timeout=20_000)
    assert page.locator("#task-progress-bar").evaluate("bar => bar.value") == 1
    page.screenshot(path=str(artifacts_dir() / "task-progress.png"))


def test_overview_counts_charts_and_screenshot(system: System, page: Any) -> None:
    for n in range(6):
        system.enqueue("demo.echo", {"n": n})
    system.enqueue("demo.sleep", {"seconds": 20})
    system.enqueue("demo.echo", {"later": True}, delay=600)
    page.goto(system.url + "/ui/")
    expect(page.locator("#live")).to_have_text("Live")
    succeeded = system.http.get("/stats").json()["by_status"]["SUCCEEDED"]
    assert succeeded >= 1
    card = page.locator('.value[data-status="SUCCEEDED"]')
    expect(card).not_to_have_text("0")
    expect(page.locator('.value[data-status="RUNNING"]')).to_have_text("1")
    expect(page.locator("#status-cards .sub").first).to_have_text(re.compile(r"\d+ scheduled"))
    default = page.locator('#queues-table tr[data-queue="default"]')
    expect(default).to_be_visible()
    expect(page.locator("#chart-throughput svg polyline")).to_have_count(3)
    late = system.enqueue("demo.echo", {"late": True})
    expect(page.locator(f'#activity a[href="#/task/{late["id"]}"]').first).to_be_visible()
    page.wait_for_timeout(2500)  # a few stream samples, so the sparklines have a shape
    page.screenshot(path=str(artifacts_dir() / "dashboard.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(artifacts_dir() / "dashboard-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")

    page.click("nav >> text=Workers")
    workers = page.locator("#workers-table tbody tr")
    expect(workers).to_have_count(1)
    expect(workers.first.locator(".badge")).to_have_text("alive")
    page.screenshot(path=str(artifacts_dir() / "workers.png"))


def test_a_failed_task_is_replayed_from_the_dlq_browser(system: System, page: Any) -> None:
    first = system.enqueue("demo.fail", {"fatal": True})
    second = system.enqueue("demo.fail", {"fatal": True}, queue="low")
    for task in (first, second):
        system.wait_for(task["id"], "FAILED")
    page.goto(system.url + "/ui/#/dlq")
    line = row(page, "#dlq-table", first["id"])
    expect(line).to_be_visible()
    expect(line.locator("td.error")).to_contain_text("fail")
    page.screenshot(path=str(artifacts_dir() / "dlq.png"), full_page=True)

    line.get_by_role("button", name=re.compile("Replay task")).click()
    expect(page.locator("#notice")).to_have_text("Replayed 1 task.")
    # Replayed: enqueued again with fresh attempts, ran, and (being fatal) failed again.
    system.wait_for(first["id"], "FAILED")
    statuses = [e["status"] for e in system.events(first["id"])]
    assert statuses.count("RUNNING") == 2, statuses

    # Replay all, filtered to the queue `low`: only the second task.
    page.select_option("#dlq-filters select[name=queue]", "low")
    page.click("#dlq-filters button[type=submit]")
    expect(page.locator("#dlq-table tbody tr")).to_have_count(1)
    page.click("#dlq-replay-all")
    confirm(page)
    expect(page.locator("#notice")).to_have_text("Replayed 1 task.")
    system.wait_for(second["id"], "FAILED")
    assert [e["status"] for e in system.events(second["id"])].count("RUNNING") == 2
    assert [e["status"] for e in system.events(first["id"])].count("RUNNING") == 2


def test_a_scheduled_task_is_cancelled_and_retried(system: System, page: Any) -> None:
    unique = {"key": "$.scheduled", "for": "2h"}
    task = system.enqueue("demo.echo", {"scheduled": True}, delay=3600, unique=unique)
    page.goto(system.url + "/ui/#/tasks?scheduled=true")
    line = row(page, "#tasks-table", task["id"])
    expect(line.locator(".badge.scheduled")).to_be_visible()
    line.locator("a").click()
    expect(page.locator("#task-scheduled")).to_be_visible()
    expect(page.locator("#task-retry")).to_be_hidden()
    # Its unique key, held while it waits.
    key = page.locator("#task-unique")
    expect(key).to_contain_text("demo.echo/$.scheduled=true · while active · until")
    expect(key).to_contain_text("· held")

    page.get_by_role("button", name="Cancel task").click()
    confirm(page)
    expect(page.locator("#task-status")).to_have_text("cancelled")
    expect(page.locator("#task-cancel")).to_be_hidden()
    assert system.task(task["id"])["status"] == "CANCELLED"
    expect(key).to_contain_text("· not held")  # cancelled: the key is free
    page.screenshot(path=str(artifacts_dir() / "task.png"), full_page=True)

    page.get_by_role("button", name="Retry task").click()
    confirm(page)
    expect(page.locator("#task-status")).not_to_have_text("cancelled")
    assert system.task(task["id"])["status"] in ("ENQUEUED", "RUNNING", "SUCCEEDED")
    expect(key).to_contain_text("released")  # an operator's retry runs it outside its key


def test_task_list_pages_with_more_and_filters(system: System, page: Any) -> None:
    items = [{"type": "demo.noop", "payload": {"n": n}, "delay": 7000} for n in range(55)]
    response = system.http.post("/enqueue/batch", json={"tasks": items})
    assert response.status_code == 201, response.text
    ids = {task["id"] for task in response.json()["tasks"]}
    page.goto(system.url + "/ui/#/tasks")
    page.fill("#task-filters input[name=type]", "demo.noop")
    page.click("#task-filters button[type=submit]")
    rows = page.locator("#tasks-table tbody tr")
    expect(rows).to_have_count(50)
    page.click("#tasks-more")
    expect(rows).to_have_count(55)
    expect(page.locator("#tasks-more")).to_be_hidden()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts_dir() / "tasks.png"))
    shown = set(rows.evaluate_all("rows => rows.map(r => r.dataset.id)"))
    assert shown == ids  # each once, none missing, in two keyset pages


def test_the_key_prompt_unlocks_the_dashboard(system: System, page: Any) -> None:
    page.goto(system.keyed_url + "/ui/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.fill("#key-input", "wrong-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_be_visible()  # refused: asked again
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(dialog).to_be_hidden()
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.locator('.value[data-status="SUCCEEDED"]')).not_to_have_text("0")
    assert page.evaluate("sessionStorage.getItem('taskq.apiKey')") == API_KEY

    page.reload()  # the key is kept for the tab
    expect(page.locator("#live")).to_have_text("Live")
    expect(dialog).to_be_hidden()
    expect(page.locator("#forget-key")).to_be_visible()


def test_the_stream_parser_handles_comments_multiline_data_and_partial_events(
    system: System, page: Any
) -> None:
    page.goto(system.url + "/ui/")
    parsed = page.evaluate(
        """async () => (await import("./stream.js")).parseEvents(
            ': hello\\n\\nevent: stats\\ndata: {"a":1}\\n\\nevent: task\\ndata: {"b":\\ndata: 2}'
            + '\\r\\n\\r\\nevent: task\\ndata: {"c"')"""
    )
    assert parsed == {
        "events": [
            {"event": "stats", "data": '{"a":1}'},
            {"event": "task", "data": '{"b":\n2}'},
        ],
        "rest": 'event: task\ndata: {"c"',
    }


def test_purging_a_queue_asks_for_its_name_and_cancels_its_tasks(system: System, page: Any) -> None:
    waiting = [system.enqueue("demo.echo", {"n": n}, queue="critical", delay=3600) for n in (1, 2)]
    page.goto(system.url + "/ui/")
    page.get_by_role("button", name="Purge queue critical").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog.locator("#confirm-ok")).to_be_disabled()
    page.fill("#confirm-input", "critica")
    expect(dialog.locator("#confirm-ok")).to_be_disabled()
    page.fill("#confirm-input", "critical")
    dialog.locator("#confirm-ok").click()
    expect(page.locator("#notice")).to_contain_text("2 tasks cancelled")
    for task in waiting:
        assert system.task(task["id"])["status"] == "CANCELLED"


def test_schedules_are_listed_paused_resumed_and_run_now(system: System, page: Any) -> None:
    body = {"cron": "0 3 * * *", "timezone": "Europe/Paris", "type": "demo.echo",
            "payload": {"from": "schedule"}}  # fmt: skip
    response = system.http.put("/schedules/nightly-echo", json=body)
    assert response.status_code in (200, 201), response.text
    try:
        page.goto(system.url + "/ui/#/schedules")
        line = page.locator('#schedules-table tbody tr[data-name="nightly-echo"]')
        expect(line).to_be_visible()
        expect(line).to_contain_text("0 3 * * * (Europe/Paris)")
        page.screenshot(path=str(artifacts_dir() / "schedules.png"), full_page=True)

        line.get_by_role("button", name="Pause").click()
        expect(page.locator("#notice")).to_have_text("nightly-echo paused.")
        expect(line.locator("td.next")).to_have_text("paused")
        assert system.http.get("/schedules/nightly-echo").json()["paused"] is True

        line.get_by_role("button", name="Run now").click()
        expect(page.locator("#notice")).to_contain_text("Enqueued task")
        task_id = system.http.get("/schedules/nightly-echo").json()["last_task_id"]
        assert system.wait_for(task_id, "SUCCEEDED")["payload"] == {"from": "schedule"}

        line.get_by_role("button", name="Resume").click()
        expect(page.locator("#notice")).to_have_text("nightly-echo resumed.")
        expect(line.locator("td.next")).not_to_have_text("paused")
        assert system.http.get("/schedules/nightly-echo").json()["paused"] is False
    finally:
        system.http.request(
            "DELETE", "/schedules/nightly-echo", headers={"content-type": "application/json"}
        )


def test_a_queue_is_paused_and_resumed_from_the_queue_list(system: System, page: Any) -> None:
    page.goto(system.url + "/ui/")
    line = page.locator('#queues-table tbody tr[data-queue="low"]')
    expect(line.locator(".paused")).to_be_hidden()
    line.get_by_role("button", name="Pause queue low").click()
    expect(page.locator("#notice")).to_contain_text("low paused")
    expect(line.locator(".paused")).to_be_visible()
    [paused] = [q for q in system.http.get("/queues").json()["queues"] if q["queue"] == "low"]
    assert paused["paused"] is True
    try:
        # The worker takes the pause in within moments of the answer: its consumer goes.
        expect(line.locator("td").nth(4)).to_have_text("0", timeout=20_000)
        waiting = system.enqueue("demo.echo", {"n": 1}, queue="low")
        done = system.enqueue("demo.echo", {"n": 2}, queue="default")
        system.wait_for(done["id"], "SUCCEEDED")
        # The stream refreshes the row: still paused (also after the page reloads).
        page.reload()
        expect(line.locator(".paused")).to_be_visible()
        assert system.task(waiting["id"])["status"] == "ENQUEUED"
        # The envelope waits, ready, in the broker.
        expect(line.locator("td").nth(3)).to_have_text("1", timeout=20_000)
        page.screenshot(path=str(artifacts_dir() / "queue-paused.png"), full_page=True)
        line.get_by_role("button", name="Resume queue low").click()
        expect(page.locator("#notice")).to_contain_text("low resumed")
        expect(line.locator(".paused")).to_be_hidden()
        system.wait_for(waiting["id"], "SUCCEEDED")
    finally:
        system.http.post("/queues/low/resume", headers={"content-type": "application/json"})


def test_a_task_type_is_paused_and_resumed_and_its_tasks_wait_meanwhile(
    system: System, page: Any
) -> None:
    try:
        page.goto(system.url + "/ui/#/types")
        line = page.locator('#types-table tbody tr[data-name="demo.echo"]')
        expect(line).to_be_visible()
        expect(line.locator("td.state")).to_have_text("active")
        line.get_by_role("button", name="Pause").click()
        expect(page.locator("#notice")).to_have_text("demo.echo paused: its tasks wait.")
        expect(line.locator("td.state")).to_have_text("paused")
        assert system.http.get("/types/demo.echo").json()["paused"] is True

        task = system.enqueue("demo.echo", {"while": "paused"})
        assert system.wait_for(task["id"], "WAITING")["wait_reason"] == "paused"
        expect(line.locator("td.waiting")).to_contain_text("1 paused", timeout=15_000)
        page.screenshot(path=str(artifacts_dir() / "types.png"), full_page=True)

        line.get_by_role("button", name="Resume").click()
        expect(page.locator("#notice")).to_have_text("demo.echo resumed.")
        expect(line.locator("td.state")).to_have_text("active")
        assert system.wait_for(task["id"], "SUCCEEDED")["result"] == {"while": "paused"}
    finally:
        system.http.post("/types/demo.echo/resume", headers={"content-type": "application/json"})


def test_rate_limits_are_listed_and_a_waiting_task_says_why(system: System, page: Any) -> None:
    response = system.http.put(
        "/types/demo.noop_sync", json={"rate_limit": {"limit": 1, "per": "1h"}}
    )
    assert response.status_code in (200, 201), response.text
    tasks: list[Any] = []
    try:
        tasks = [system.enqueue("demo.noop_sync", {}) for _ in range(2)]
        # Either task may take the hour's one start: the worker claims them concurrently.
        deadline = 30.0
        seen = [system.task(task["id"]) for task in tasks]
        while deadline > 0 and not (
            {t["status"] for t in seen} == {"SUCCEEDED", "ENQUEUED"}
            and any(t["limited_by"] for t in seen)
        ):
            page.wait_for_timeout(100)
            deadline -= 0.1
            seen = [system.task(task["id"]) for task in tasks]
        ran, waiting = sorted(seen, key=lambda t: t["status"] != "SUCCEEDED")
        assert ran["status"] == "SUCCEEDED" and ran["attempts"] == 1, seen
        assert waiting["status"] == "ENQUEUED", seen
        assert waiting["limited_by"] == "type:demo.noop_sync", seen

        page.goto(system.url + "/ui/#/limits")
        line = page.locator('#limits-table tbody tr[data-name="type:demo.noop_sync"]')
        expect(line).to_be_visible()
        expect(line.locator("td.rate")).to_have_text("1 per 3600s")
        expect(line.locator("td.types")).to_have_text("demo.noop_sync")
        page.screenshot(path=str(artifacts_dir() / "limits.png"), full_page=True)

        page.goto(system.url + f"/ui/#/task/{waiting['id']}")
        badge = page.locator("#task-limited")
        expect(badge).to_be_visible()
        expect(badge).to_contain_text("rate limited by type:demo.noop_sync until")
        expect(page.locator("#task-status")).to_have_text("enqueued")
    finally:
        system.http.put("/types/demo.noop_sync", json={"rate_limit": None})
        for task in tasks:  # the one that ran answers 409, already ended
            system.http.post(
                f"/tasks/{task['id']}/cancel", json={}, headers={"content-type": "application/json"}
            )


def test_a_workflows_graph_shows_its_nodes_live_and_cancels(system: System, page: Any) -> None:
    nodes = [
        {"name": "fetch", "type": "demo.echo", "payload": {"step": "fetch"}},
        {"name": "slow", "type": "demo.sleep", "payload": {"seconds": 60}},
        {"name": "publish", "type": "demo.echo", "payload": {}, "depends_on": ["fetch", "slow"]},
    ]
    response = system.http.post("/workflows", json={"name": "ui-graph", "nodes": nodes})
    assert response.status_code == 201, response.text
    workflow = response.json()
    page.goto(system.url + f"/ui/#/workflow/{workflow['id']}")
    graph = page.locator("#workflow-graph svg")
    expect(graph).to_be_visible()
    node = {n["name"]: graph.locator(f'g.node[data-name="{n["name"]}"]') for n in nodes}
    # Redrawn as the nodes move: fetch succeeds, slow runs, publish waits for both.
    expect(node["fetch"]).to_have_attribute("data-status", "SUCCEEDED", timeout=30_000)
    expect(node["slow"]).to_have_attribute("data-status", "RUNNING", timeout=30_000)
    expect(node["publish"]).to_have_attribute("data-status", "WAITING")
    assert graph.locator("path[data-to='publish']").count() == 2
    expect(page.locator("#workflow-status")).to_have_text("running")
    expect(page.locator("#workflow-facts")).to_contain_text("Succeeded1")
    page.screenshot(path=str(artifacts_dir() / "workflow.png"), full_page=True)

    page.locator("#workflow-cancel").click()
    confirm(page)
    expect(page.locator("#notice")).to_have_text("Workflow cancelled.")
    expect(node["publish"]).to_have_attribute("data-status", "CANCELLED", timeout=30_000)
    expect(node["slow"]).to_have_attribute("data-status", "CANCELLED", timeout=30_000)
    expect(page.locator("#workflow-status")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#workflow-cancel")).to_be_hidden()
    assert system.http.get(f"/workflows/{workflow['id']}").json()["status"] == "CANCELLED"

    # The list, filtered by name, links back to it.
    page.goto(system.url + "/ui/#/workflows?name=ui-graph")
    line = page.locator(f'#workflows-table tbody tr[data-id="{workflow["id"]}"]')
    expect(line).to_contain_text("cancelled")
    expect(line.locator("td.succeeded")).to_have_text("1")
    line.get_by_role("link").click()
    expect(page.locator("#workflow-id")).to_contain_text(workflow["id"])

    # A node's task page links to its workflow.
    page.goto(system.url + f"/ui/#/task/{workflow['nodes'][0]['task_id']}")
    page.locator("#task-workflow").click()
    expect(page.locator("#workflow-id")).to_contain_text(workflow["id"])


def test_a_large_workflow_is_drawn_by_level(system: System, page: Any) -> None:
    branches = [{"name": f"b{i}", "type": "demo.noop", "payload": {}} for i in range(300)]
    callback = {"name": "done", "type": "demo.echo", "payload": {},
                "depends_on": [b["name"] for b in branches]}  # fmt: skip
    response = system.http.post("/workflows", json={"nodes": [*branches, callback]})
    assert response.status_code == 201, response.text
    workflow_id = response.json()["id"]
    page.goto(system.url + f"/ui/#/workflow/{workflow_id}")
    levels = page.locator("#workflow-graph ol.levels")
    expect(levels.locator("li")).to_have_count(2)
    expect(levels.locator('li[data-level="0"]')).to_contain_text("300 nodes")
    expect(levels.locator('li[data-level="1"] .badge[data-state="SUCCEEDED"]')).to_have_text(
        "1 succeeded", timeout=60_000
    )
    expect(levels.locator('li[data-level="0"] .badge[data-state="SUCCEEDED"]')).to_have_text(
        "300 succeeded"
    )
    expect(page.locator("#workflow-status")).to_have_text("succeeded")
