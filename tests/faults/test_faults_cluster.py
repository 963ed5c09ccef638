"""The promises on a three-node RabbitMQ cluster while its nodes are killed (issue 19, item 4).

A private cluster (:mod:`tests.support.private_cluster`: three nodes from the
machine's installed binaries) carries the topology, every queue a quorum queue
with a replica on each node. ``taskq api`` and a ``taskq worker`` get all three
URLs in ``TASKQ_AMQP_URL``; HTTP clients enqueue the whole time. Then, under that
load, a follower of the work queue is SIGKILLed and restarted, and after it the
node that leads the work queue (restarted only if another round follows). Nothing
tells the processes: their connections move to another node by themselves.

The audit of :mod:`tests.support.faults` ends it (lost 0, duplicate successes 0,
nothing stuck), and the figures include the longest time without progress: the
widest gap between two consecutive successes (``finished_at``) around each kill.
Collected only with ``TASKQ_TEST_CLUSTER=1`` (tests/conftest.py).
Run with ``-s`` to see them. ``TASKQ_TEST_CLUSTER_ROUNDS=N`` repeats the two
kills N times (the longer run; the fault suite runs one round).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import declare_topology
from tests.support.fault_load import (
    Load,
    api_process,
    committed,
    consumers,
    finishes,
    progress,
    put_record_type,
)
from tests.support.faults import all_terminal, audit, eventually, processes
from tests.support.private_cluster import PrivateCluster, private_cluster
from tests.support.private_services import PrivateRabbit
from tests.support.services import make_settings

__all__ = ["private_cluster"]  # a fixture, used by name

# TASKQ_TEST_*: tests/conftest.py clears every other TASKQ_* variable.
ROUNDS = max(1, int(os.environ.get("TASKQ_TEST_CLUSTER_ROUNDS", "1")))

pytestmark = [
    pytest.mark.fault,
    pytest.mark.integration,
    # The cluster's start (about a minute on a loaded 2-core machine) is the fixture's.
    pytest.mark.timeout(420 + 240 * (ROUNDS - 1)),
]

# Failed attempts come back after 1 s, not 5 s.
RETRY_FAST = {"TASKQ_BACKOFF_STRATEGY": "fixed", "TASKQ_BACKOFF_FIXED": "1"}


@dataclass
class Kill:
    role: str  # "follower" or "leader" (of the work queue)
    node: str
    at: float  # wall clock (time.time()), comparable with Postgres's now()
    restarted_after: float = 0.0  # seconds from the kill to the node running again


def connections_by_node(cluster: PrivateCluster) -> dict[str, list[str]]:
    """The names of the taskq connections each node holds (read from the server port)."""
    out = cluster._some_running().ctl(
        "list_connections", "port", "client_properties", "--formatter", "json", timeout=60
    )
    by_port = {node.port: node.node for node in cluster.nodes}
    held: dict[str, list[str]] = {node.node: [] for node in cluster.nodes}
    for row in json.loads(out):
        properties = row.get("client_properties") or []
        names = [p[2] for p in properties if isinstance(p, list) and p[0] == "connection_name"]
        if row.get("port") in by_port and names and str(names[0]).startswith("taskq-"):
            held[by_port[row["port"]]].append(str(names[0]))
    return held


def replicas(cluster: PrivateCluster, settings: Settings) -> dict[str, tuple[str, int, int]]:
    """Each of the topology's queues: (type, members, members online)."""
    rows = cluster.queues()
    out = {}
    for queue in settings.topology().queues:
        row = rows.get(queue.name, {})
        members, online = row.get("members") or [], row.get("online") or []
        assert isinstance(members, list) and isinstance(online, list)
        out[queue.name] = (str(row.get("type")), len(members), len(online))
    return out


def moved_logged(logs: Path) -> int:
    """How often the processes' logs say a connection reconnected to another node."""
    return sum(p.read_text().count("reconnected to the broker at") for p in logs.glob("*.log"))


def stall_around(done: list[float], at: float) -> float:
    """The gap between the last success before ``at`` and the first after it (seconds)."""
    before = [t for t in done if t <= at]
    after = [t for t in done if t > at]
    if not before or not after:
        return float("inf")
    return after[0] - before[-1]


def widest_gap(done: list[float]) -> tuple[float, float]:
    """The widest gap between consecutive successes: (seconds, when it began)."""
    gaps = [(b - a, a) for a, b in itertools.pairwise(done)]
    return max(gaps) if gaps else (0.0, 0.0)


async def test_a_follower_then_the_work_queues_leader_killed_under_load_lose_nothing(
    private_cluster: PrivateCluster, database_url: str, namespace: str, tmp_path: Path
) -> None:
    """SIGKILL a follower of the work queue and restart it, then SIGKILL its leader and
    keep it down: every task accepted SUCCEEDS once, and work goes on within seconds."""
    cluster = private_cluster
    settings = make_settings(
        database_url=database_url, amqp_url=cluster.amqp_url, namespace=namespace, max_delay="1h"
    )
    assert len(settings.amqp_urls) == 3
    await declare_topology(settings)
    declared = await asyncio.to_thread(replicas, cluster, settings)
    # Work, delay and dead-letter queues alike: quorum queues with a replica on each node.
    assert declared == {name: ("quorum", 3, 3) for name in declared}, declared
    await put_record_type(database_url)
    work_queue = settings.topology().names.queue("default")
    kills: list[Kill] = []
    held: list[dict[str, list[str]]] = []
    began = time.monotonic()
    phases: dict[str, float] = {}  # where the test's time went, for the figures

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - began - sum(phases.values()), 1)

    async with processes(settings, tmp_path) as procs, api_process(procs) as http:
        api = procs.started[0]
        worker = await procs.worker(**RETRY_FAST)

        async def consuming() -> bool:
            return await consumers(settings) == 1

        await eventually(consuming, 60, "the worker consuming")
        load = Load(http.base_url.port or 0)
        load.start()
        await progress(database_url, load.marker, "tasks running before the faults")
        phase("set-up")

        async def kill(node: PrivateRabbit, role: str, restart: bool) -> None:
            kills.append(Kill(role, node.node, time.time()))
            await asyncio.to_thread(cluster.kill, node)
            await progress(database_url, load.marker, f"tasks running after the {role} died", 90)
            await asyncio.sleep(2.0)  # load goes on with a node down
            phase(f"{role} {len(kills)} killed")
            if restart:
                await asyncio.to_thread(cluster.restart, node)
                kills[-1].restarted_after = time.time() - kills[-1].at
                await progress(database_url, load.marker, f"tasks running with the {role} back")
                phase(f"{role} {len(kills)} restarted")

        for n in range(1, ROUNDS + 1):
            leader = await asyncio.to_thread(cluster.leader_of, work_queue)
            held.append(await asyncio.to_thread(connections_by_node, cluster))
            # Kill the follower holding the most of taskq's connections, so that
            # failover is exercised by the follower's death too where it can be.
            followers = [n for n in cluster.nodes if n is not leader]
            follower = max(followers, key=lambda n: len(held[-1][n.node]))
            await kill(follower, "follower", restart=True)
            rejoined = await asyncio.to_thread(replicas, cluster, settings)
            assert rejoined == declared, f"replicas after the follower's restart: {rejoined}"
            # The leader is restarted only for another round: the last ends with it down.
            await kill(leader, "leader", restart=n < ROUNDS)
        await asyncio.sleep(2.0)
        await load.finish()

        ids = await committed(database_url, load.marker)
        db = await asyncpg.connect(database_url)
        try:
            phase("faults")
            await all_terminal(db, ids, timeout=120)
            phase("all terminal")
            done = await finishes(database_url, load.marker)
            stalls = [round(stall_around(done, k.at), 2) for k in kills]
            gap, gap_began = widest_gap(done)
            extra = {
                "answered 201": len(load.accepted),
                "answers": load.statuses(),
                "slowest answer (s)": round(max(a[1] for a in load.answers), 2),
                "kills": [f"{k.role} {k.node.split('@')[0]}" for k in kills],
                "stall at each kill (s)": stalls,
                "widest gap between successes (s)": round(gap, 2),
                "widest gap began (s after the first kill)": round(gap_began - kills[0].at, 1),
                "node back and running after (s)": [
                    round(k.restarted_after, 1) for k in kills if k.restarted_after
                ],
                "phases (s)": phases,
                "taskq connections per node before each follower's kill": [
                    {node.split("@")[0]: len(names) for node, names in h.items()} for h in held
                ],
            }
            figures = await audit(
                db, ids, f"3-node cluster, {ROUNDS} round(s)", faults=len(kills), extra=extra
            )
        finally:
            await db.close()
        alive = [p.returncode is None for p in (api, worker)]
        await procs.stop(worker)

    after = await asyncio.to_thread(cluster.queues)
    reconnects = moved_logged(tmp_path)
    print(f"[fault] cluster: reconnections to another node logged = {reconnects}")
    assert alive == [True, True], "a process died instead of moving to another node"
    assert load.statuses() == {"201": len(load.accepted)}, load.statuses()
    assert set(load.accepted) <= set(ids), "a 201 was answered for a task not in Postgres"
    assert figures.statuses == {"SUCCEEDED": len(ids)}
    assert figures.executions >= len(ids)
    # Each kill took a node that held taskq connections (the follower chosen so where
    # one did; else they were all on the leader): at least one moved to another node.
    assert reconnects >= 1, "no connection moved to another node"
    assert all(stall != float("inf") for stall in stalls), stalls
    # The killed leader's queues elected a new leader among the two nodes left.
    assert after[work_queue]["leader"] != kills[-1].node, after[work_queue]
    assert len(after[work_queue]["online"]) == 2, after[work_queue]  # type: ignore[arg-type]


def test_finished_at_gaps_are_read_around_each_kill() -> None:
    """The stall figures' arithmetic, on made-up finish times."""
    done = [10.0, 10.1, 10.2, 14.2, 14.3]
    assert stall_around(done, 12.0) == pytest.approx(4.0)
    assert stall_around(done, 10.15) == pytest.approx(0.1)
    assert stall_around(done, 20.0) == float("inf")
    gap, began = widest_gap(done)
    assert gap == pytest.approx(4.0) and began == 10.2
    assert widest_gap([]) == (0.0, 0.0)
