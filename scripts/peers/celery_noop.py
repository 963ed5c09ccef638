"""The noop task on Celery 5: RabbitMQ broker, ``acks_late``, persistent messages,
results ignored unless ``BENCH_PEER_BACKEND`` names a result backend
(``db+postgresql://...`` for the durable comparison).

Worker: ``celery -A peers.celery_noop worker``; enqueuer: ``python -m peers.celery_noop enqueue N``.
"""

from __future__ import annotations

import os

from celery import Celery

from peers import enqueuer_main, mark

QUEUE = os.environ["BENCH_PEER_QUEUE"]
BACKEND = os.environ.get("BENCH_PEER_BACKEND") or None

app = Celery("bench", broker=os.environ["BENCH_PEER_BROKER"], backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_acks_late=True,
    task_default_delivery_mode="persistent",
    task_ignore_result=BACKEND is None,
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(sent: float = 0.0) -> None:
    mark(sent)


def _prepare() -> None:
    if BACKEND is not None:  # create the result tables before the workers race to
        app.backend.ResultSession().close()


if __name__ == "__main__":
    enqueuer_main(lambda sent: noop.apply_async((sent,)), _prepare)
