"""The app's tasks: the handler the worker runs (``taskq worker orders.tasks``) and the
client the views enqueue with.

The client connects on first use, once per process: a gunicorn or uWSGI worker
forked from a master that imported this module gets connections of its own.
"""

from typing import Any

from taskq import Context, Registry, SyncClient

handlers = Registry()


@handlers.task("shop.order_confirmation.v1", max_attempts=5)
def send_confirmation(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Runs in the worker (in a thread: a sync handler): the e-mail would be sent here."""
    ctx.log.info("order %s confirmed to %s", payload["order_id"], payload["email"])
    return {"sent_to": payload["email"]}


client = SyncClient()
