"""The examples in examples/ run against the real Postgres and RabbitMQ: an order placed
through each app commits its row and its task together (a worker runs the task), and an
order that fails after the enqueue (out of stock) leaves neither."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from types import ModuleType
from typing import Any

import asyncpg
import httpx
import pytest

from taskq.settings import Settings
from tests.support import ROOT
from tests.support.services import subprocess_env
from tests.support.worker_fixtures import harness, running_worker

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "examples"
ORDER = {"sku": "book", "email": "reader@example.com"}


def load_fastapi_example() -> ModuleType:
    """examples/fastapi/orders_api.py, imported from its file (its folder is not a package)."""
    path = EXAMPLES / "fastapi" / "orders_api.py"
    spec = importlib.util.spec_from_file_location("orders_api", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def counts(settings: Settings, orders_table: str) -> tuple[int, int]:
    """How many orders the example's table holds, and how many tasks taskq's."""
    connection = await asyncpg.connect(settings.database_url)
    try:
        orders = await connection.fetchval(f"SELECT count(*) FROM {orders_table}")
        tasks = await connection.fetchval("SELECT count(*) FROM taskq.tasks")
        return orders, tasks
    finally:
        await connection.close()


async def test_fastapi_example_commits_the_order_and_its_task_together(
    settings: Settings,
) -> None:
    example = load_fastapi_example()
    app = example.create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        harness(settings) as h,
        running_worker(settings, example.handlers),  # registers the example's task type
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://localhost") as http,
    ):
        connection = await asyncpg.connect(settings.database_url)
        try:
            await connection.execute("INSERT INTO shop_stock VALUES ('book', 1)")
        finally:
            await connection.close()

        placed = await http.post("/orders", json=ORDER)
        assert placed.status_code == 201, placed.text
        task = await h.wait_for(uuid.UUID(placed.json()["task_id"]), "SUCCEEDED")
        assert task.result is not None and "reader@example.com" in task.result

        sold_out = await http.post("/orders", json=ORDER)  # fails after its enqueue
        assert sold_out.status_code == 409, sold_out.text
        assert (await http.post("/orders", json={"sku": "book"})).status_code == 422
        assert await counts(settings, "shop_orders") == (1, 1)


async def test_django_example_commits_the_order_and_its_task_together(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example reads taskq's settings (its database too) from TASKQ_* variables.
    for name, value in subprocess_env(settings).items():
        if name.startswith("TASKQ_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "mysite.settings")
    monkeypatch.syspath_prepend(str(EXAMPLES / "django"))
    tasks = importlib.import_module("orders.tasks")

    def place_orders() -> list[tuple[int, Any]]:
        """Django's part, in a thread of its own as a WSGI server's (no event loop there)."""
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connections
        from django.test import Client
        from orders.models import Stock  # type: ignore[import-not-found]

        try:
            call_command("migrate", verbosity=0)
            Stock.objects.create(sku="book", available=1)
            http = Client()
            answers = [
                http.post("/orders", ORDER, content_type="application/json"),
                http.post("/orders", ORDER, content_type="application/json"),  # sold out
                http.post("/orders", {"sku": "book"}, content_type="application/json"),
            ]
            return [(answer.status_code, answer.json()) for answer in answers]
        finally:
            connections.close_all()

    try:
        async with harness(settings) as h, running_worker(settings, tasks.handlers):
            placed, sold_out, invalid = await asyncio.to_thread(place_orders)
            assert placed[0] == 201, placed
            task = await h.wait_for(uuid.UUID(placed[1]["task_id"]), "SUCCEEDED")
            assert task.result is not None and "reader@example.com" in task.result
            assert sold_out == (409, {"error": "book is out of stock"})
            assert invalid[0] == 400
            assert await counts(settings, "orders_order") == (1, 1)
    finally:
        await asyncio.to_thread(tasks.client.close)
