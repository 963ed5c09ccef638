"""Peers for `scripts/bench --peer`: the same noop task on Celery and on Dramatiq.

Each peer module defines ``noop(sent)``, configured from the environment
(``BENCH_PEER_QUEUE``, ``BENCH_PEER_BROKER``, ``BENCH_PEER_BACKEND``,
``BENCH_PEER_MARKS``), and runs as its own process both as the worker and as
the enqueuer (``python -m peers.<name> enqueue COUNT [INTERVAL]``), so every
variant gets its own configuration.

Peers persist nothing we could count, so every run of ``noop`` appends one
fixed-width record to the marks file: its start time and, when the enqueuer
sent a timestamp, the enqueue-to-start latency. One ``os.write`` on an
``O_APPEND`` descriptor is atomic across processes and threads and costs a
few microseconds; taskq's figures pay no such cost.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

RECORD = 29  # "%17.6f %10.6f\n"
_fd: dict[int, int] = {}


def mark(sent: float) -> None:
    """Record that a task started: now, and now - sent if the enqueuer sent a time."""
    now = time.time()
    pid = os.getpid()
    if pid not in _fd:  # one descriptor per process, opened after any fork
        _fd[pid] = os.open(os.environ["BENCH_PEER_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_fd[pid], b"%17.6f %10.6f\n" % (now, now - sent if sent else 0.0))


def read_marks(path: str) -> list[tuple[float, float]]:
    """The (start, latency) records of a marks file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [
        (float(data[i : i + 17]), float(data[i + 18 : i + 28]))
        for i in range(0, len(data) - len(data) % RECORD, RECORD)
    ]


def count_marks(path: str) -> int:
    try:
        return os.stat(path).st_size // RECORD
    except FileNotFoundError:
        return 0


def enqueuer_main(
    send: Callable[[float], None],
    prepare: Callable[[], None] | None = None,
    finish: Callable[[], None] | None = None,
) -> None:
    """``enqueue COUNT [INTERVAL]``: send COUNT noops, INTERVAL seconds apart if given
    (then each carries its send time), then ``finish`` (close the connection: a
    peer publishing without confirms loses what the socket still holds if the
    process exits with its connection open); print the time of the first send."""
    _, command, count, *rest = sys.argv
    assert command == "enqueue", command
    interval = float(rest[0]) if rest else 0.0
    if prepare is not None:
        prepare()
    # The clock starts before the first send, so it includes connecting (tens of ms).
    first = time.time()
    for n in range(int(count)):
        if interval:
            time.sleep(max(0.0, first + n * interval - time.time()))
            send(time.time())
        else:
            send(0.0)
    if finish is not None:
        finish()
    print(f"{first:.6f}", flush=True)
