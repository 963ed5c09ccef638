"""The retention soak's short mode (issue #19): ``scripts/soak_retention.py`` for 30 s.

The script runs a worker as fast as it can with a retention of 4 s and a feeder
that keeps a backlog ahead of it. Checked here: the script runs to its verdict;
tasks finished and retention deleted them as they aged; and at no sample was a
finished task older than the retention, the sweeper's rest and a grace of 10 s
(the overdue count): retention kept up with the rate, whatever the rate was on
this machine. The 30-minute run, whose figures are in docs/benchmark.md, is the
same script with ``--minutes 30``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import free_port

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak_retention.py"


def two_free_ports() -> int:
    """A free port whose next one is free too (the script's worker serves its metrics there)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_the_short_soak_keeps_retention_up_with_the_rate(
    postgres_server_url: str, amqp_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKQ_")}
    env.update(TASKQ_BENCH_DATABASE_URL=postgres_server_url, TASKQ_BENCH_AMQP_URL=amqp_url)
    command = [
        sys.executable,
        str(SCRIPT),
        "--minutes", "0.5",
        "--retention", "4",
        "--workers", "1",
        "--backlog", "5000",
        "--sample", "3",
        "--table-every", "9",
        "--port", str(two_free_ports()),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    report = json.loads(last)
    soak, samples = report["soak"], report["samples"]

    assert soak["finished"] > 0
    assert 0 < soak["deleted"] <= soak["finished"]
    assert [s["overdue"] for s in samples] == [0] * len(samples), done.stdout[-4000:]
    assert soak["overdue"] == 0
    assert "throughput:" in done.stdout and "retention:" in done.stdout
