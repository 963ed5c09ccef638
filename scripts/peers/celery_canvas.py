"""Celery 5's chord and chain for ``scripts/bench --workflows --peer celery``: the app of
:mod:`peers.celery_noop` (RabbitMQ broker, ``acks_late``, persistent messages) with the
Postgres result backend that a chord needs (``BENCH_PEER_BACKEND``, required).

Worker: ``celery -A peers.celery_canvas worker``. Enqueuer: ``python -m
peers.celery_canvas chord N`` (N ``bench.echo`` tasks, ``bench.collect`` their
callback) or ``chain N`` (N ``bench.step`` tasks, each given the result of the one
before). It connects first, then prints one line: the time just before it built the
canvas, the id of the task whose success ends the workload (the chord's callback,
the chain's last step) and the CPU seconds it used from that time on.

Every task appends a record to the marks file (:func:`peers.mark`), so a stalled run
says how far it got.
"""

from __future__ import annotations

import os
import sys
import time

from celery import Celery, chain, chord

from peers import mark

QUEUE = os.environ["BENCH_PEER_QUEUE"]
BACKEND = os.environ["BENCH_PEER_BACKEND"]

app = Celery("bench_canvas", broker=os.environ["BENCH_PEER_BROKER"], backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_acks_late=True,
    task_default_delivery_mode="persistent",
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.echo")
def echo(i: int) -> int:
    mark(0.0)
    return i


@app.task(name="bench.collect")
def collect(results: list[int]) -> int:
    mark(0.0)
    return len(results)


@app.task(name="bench.step")
def step(previous: int) -> int:
    mark(0.0)
    return previous + 1


def main() -> None:
    _, shape, count = sys.argv
    n = int(count)
    app.backend.ResultSession().close()  # the result tables, before the workers race to
    with app.pool.acquire(block=True) as connection:  # connected before the clock starts
        connection.ensure_connection(max_retries=3)
    cpu, first = time.process_time(), time.time()
    if shape == "chord":
        result = chord(echo.s(i) for i in range(n))(collect.s())
    elif shape == "chain":
        result = chain(step.s(0), *(step.s() for _ in range(n - 1))).apply_async()
    else:
        raise SystemExit(f"unknown shape {shape!r}: chord or chain")
    print(f"{first:.6f} {result.id} {time.process_time() - cpu:.6f}", flush=True)


if __name__ == "__main__":
    main()
