"""A FastAPI app taking orders: the route writes its order row and enqueues the
confirmation in one asyncpg transaction, so the task exists only if the order does.

Run it from this folder (README.md): ``taskq worker orders_api`` runs the handler
below (and registers its task type), ``uvicorn orders_api:app`` serves the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from taskq import Client, Context, InvalidRequest, Registry, Settings, load_settings

handlers = Registry()


@handlers.task("shop.order_confirmation.v1", max_attempts=5)
async def send_confirmation(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Runs in the worker: here is where the e-mail would be sent."""
    ctx.log.info("order %s confirmed to %s", payload["order_id"], payload["email"])
    return {"sent_to": payload["email"]}


# The app's own tables, in the database taskq uses (the transaction spans both).
TABLES = """
CREATE TABLE IF NOT EXISTS shop_stock (
    sku text PRIMARY KEY,
    available int NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS shop_orders (
    id bigserial PRIMARY KEY,
    sku text NOT NULL,
    email text NOT NULL
);
"""


class Order(BaseModel):
    sku: str
    email: str


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; ``settings`` default to taskq's (``TASKQ_*`` variables, ``.env``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or load_settings()
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=10)
        try:
            async with pool.acquire() as connection:
                await connection.execute(TABLES)
            async with Client.connect(config) as client:
                app.state.pool, app.state.tasks = pool, client
                yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)
    app.post("/orders", status_code=201)(place_order)
    return app


async def place_order(order: Order, request: Request) -> dict[str, Any]:
    """Record the order, enqueue its confirmation, reserve the stock: all or nothing."""
    pool: asyncpg.Pool = request.app.state.pool
    tasks: Client = request.app.state.tasks
    async with pool.acquire() as connection, connection.transaction():
        order_id = await connection.fetchval(
            "INSERT INTO shop_orders (sku, email) VALUES ($1, $2) RETURNING id",
            order.sku,
            order.email,
        )
        try:
            task = await tasks.enqueue(
                "shop.order_confirmation.v1",
                {"order_id": order_id, "email": order.email},
                connection=connection,  # the task is written in this transaction
            )
        except InvalidRequest as exc:
            raise HTTPException(400, str(exc)) from exc
        reserved = await connection.fetchval(
            "UPDATE shop_stock SET available = available - 1"
            " WHERE sku = $1 AND available > 0 RETURNING sku",
            order.sku,
        )
        if reserved is None:
            # Raising inside the transaction rolls it back: no order, no task.
            raise HTTPException(409, f"{order.sku} is out of stock")
    # Committed: the relay, woken by the commit, publishes the task now.
    return {"order_id": order_id, "task_id": str(task.id)}


app = create_app()
