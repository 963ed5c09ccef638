"""The noop task on Dramatiq: RabbitMQ broker, no result backend (Dramatiq persists nothing).

Worker: ``dramatiq peers.dramatiq_noop``; enqueuer: ``python -m peers.dramatiq_noop enqueue N``.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from peers import enqueuer_main, mark

QUEUE = os.environ["BENCH_PEER_QUEUE"]

dramatiq.set_broker(RabbitmqBroker(url=os.environ["BENCH_PEER_BROKER"]))


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(sent: float = 0.0) -> None:
    mark(sent)


if __name__ == "__main__":
    enqueuer_main(noop.send, finish=dramatiq.get_broker().close)
