"""A running taskq (API and demo worker processes) and headless Chromium for the
dashboard tests.

Chromium is Debian's ``chromium`` (or ``TASKQ_TEST_CHROMIUM``), driven by
Playwright through ``executable_path``: nothing is downloaded. Without it the
tests skip locally and fail under ``CI`` (``scripts/test`` installs it there).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from taskq.settings import Settings

from . import ROOT
from .api_fixtures import declare_topology
from .services import (
    delete_namespace,
    drop_database,
    free_port,
    make_settings,
    read_unqualified,
    subprocess_env,
    unavailable,
    with_database,
)

API_KEY = "dashboard-test-key"


def chromium_path() -> str:
    """The Chromium binary, or a skip (a failure under CI) naming what is missing."""
    candidate = os.environ.get("TASKQ_TEST_CHROMIUM") or shutil.which("chromium")
    if not candidate or not os.access(candidate, os.X_OK):
        where = candidate or "no `chromium` on PATH"
        unavailable("Chromium", f"{where} (apt-get install chromium, or set TASKQ_TEST_CHROMIUM)")
    assert candidate is not None
    return candidate


def artifacts_dir() -> Path:
    path = Path(os.environ.get("TASKQ_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Process:
    """A ``python -m taskq`` child whose output goes to a log file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Process:
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "taskq", *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class System:
    """One database and namespace served by an open API, a keyed API and a worker."""

    settings: Settings
    url: str  # the open API (no keys)
    keyed_url: str  # the same system behind TASKQ_API_KEYS
    http: httpx.Client

    def enqueue(self, task_type: str, payload: dict[str, Any] | None = None, **options: Any) -> Any:
        body = {"type": task_type, "payload": payload or {}, **options}
        response = self.http.post("/enqueue", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def task(self, task_id: str) -> Any:
        response = self.http.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def events(self, task_id: str) -> list[Any]:
        events: list[Any] = self.http.get(f"/tasks/{task_id}/events").json()["events"]
        return events

    def wait_for(self, task_id: str, *statuses: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task["status"] in statuses:
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} is {task['status']}, wanted {statuses}")
            time.sleep(0.1)


def wait_until_up(url: str, process: Process, path: str = "/healthz") -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.popen is not None
        if process.popen.poll() is not None:
            pytest.fail(f"taskq {process.args[0]} exited early:\n{process.output()}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"taskq {process.args[0]} did not come up:\n{process.output()}")


async def _create_database(server_url: str, template: str) -> str:
    name = f"taskq_ui_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        await read_unqualified(connection, name)
    finally:
        await connection.close()
    return name


@pytest.fixture(scope="module")
def system(
    postgres_server_url: str, template_database: str, amqp_url: str, tmp_path_factory: Any
) -> Iterator[System]:
    """A whole taskq for the module: two API processes (one with keys) and a demo worker."""
    database = asyncio.run(_create_database(postgres_server_url, template_database))
    settings = make_settings(
        database_url=with_database(postgres_server_url, database),
        amqp_url=amqp_url,
        namespace=f"t{uuid.uuid4().hex[:10]}",
        max_delay="2h",
    )
    asyncio.run(declare_topology(settings))
    logs = tmp_path_factory.mktemp("processes")
    env = subprocess_env(settings, TASKQ_LOG_LEVEL="INFO")
    port, keyed_port = free_port(), free_port()
    api = Process(["api", "--port", str(port)], env, logs / "api.log").start()
    keyed = Process(
        ["api", "--port", str(keyed_port)],
        {**env, "TASKQ_API_KEYS": API_KEY},
        logs / "api-keyed.log",
    ).start()
    worker_env = {**env, "TASKQ_WORKER_SHUTDOWN_GRACE": "1s"}  # demo.sleep need not finish
    worker = Process(
        ["worker", "taskq.demo", "--concurrency", "4"], worker_env, logs / "worker.log"
    )
    worker.start()
    url, keyed_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{keyed_port}"
    try:
        wait_until_up(url, api)
        wait_until_up(keyed_url, keyed)
        wait_until_up(url, worker, "/types/demo.fail")  # the worker registered its types
        # A connection idle for 2 s is not reused: the API (uvicorn) closes one idle for
        # 5 s, and a request sent on it as it closes was reset (a test between two
        # steps of a browser easily waits that long).
        limits = httpx.Limits(keepalive_expiry=2.0)
        with httpx.Client(base_url=url, timeout=30, limits=limits) as http:
            yield System(settings, url, keyed_url, http)
    finally:
        for process in (worker, api, keyed):
            process.stop()
        asyncio.run(delete_namespace(settings))
        asyncio.run(drop_database(postgres_server_url, database))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable("Playwright", exc)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


def _console_error(errors: list[str], message: Any) -> None:
    # Chromium logs every 4xx as "Failed to load resource"; the page handles those
    # (401 asks for the key, 404 says "no such task"). 5xx are caught from responses.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        errors.append(f"console: {message.text}")


def _server_error(errors: list[str], response: Any) -> None:
    if response.status >= 500:
        errors.append(f"{response.status} from {response.request.method} {response.url}")


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (own session storage); fails the test on a script error, a console
    error or a 5xx answer."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    tab.on("console", lambda message: _console_error(errors, message))
    tab.on("response", lambda response: _server_error(errors, response))
    tab.set_default_timeout(15_000)
    yield tab
    context.close()
    assert not errors, errors
