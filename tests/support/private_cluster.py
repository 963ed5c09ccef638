"""A private three-node RabbitMQ cluster, started from the machine's installed binaries.

Like :class:`~tests.support.private_services.PrivateRabbit`, whose nodes it is made
of, it is the real RabbitMQ: three Erlang nodes of the tests' own (own node names,
AMQP and distribution ports, data and logs in a temporary directory, one shared
Erlang cookie), clustered with ``rabbitmqctl join_cluster``. The fault scenario
SIGKILLs and restarts its nodes; the machine's shared broker is never touched.

Three Erlang VMs cost memory and CPU on a small machine: the fixture is
module-scoped, the nodes' schedulers do not busy-wait (``+sbwt none``), and every
wait is generous and fails naming the node and the step it was at.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from .private_services import PrivateRabbit, rabbit_sbin
from .services import unavailable

SIZE = 3
# Idle Erlang schedulers spin before they sleep; on a 2-core machine shared with
# other test runs three spinning VMs would take a core between them for nothing.
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"
CLUSTER_TIMEOUT = 180.0
QUERY_ATTEMPTS = 4

T = TypeVar("T")


class ClusterError(RuntimeError):
    """A step of the cluster's start or of a query failed (the message says which)."""


class PrivateCluster:
    """Three RabbitMQ nodes clustered together; :meth:`start` once, :meth:`destroy` at the end."""

    def __init__(self, sbin: Path, base: Path, size: int = SIZE) -> None:
        self.base = base
        cookie = secrets.token_hex(16).upper()
        self.nodes: list[PrivateRabbit] = []
        for n in range(size):
            home = base / f"node{n + 1}"
            home.mkdir()
            self.nodes.append(PrivateRabbit(sbin, home, cookie=cookie, erl_args=ERL_ARGS))

    @property
    def urls(self) -> list[str]:
        """Each node's AMQP URL, in node order."""
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """``TASKQ_AMQP_URL`` for the whole cluster: every node's URL, comma-separated."""
        return ",".join(self.urls)

    def node_named(self, name: str) -> PrivateRabbit:
        for node in self.nodes:
            if node.node == name:
                return node
        raise ClusterError(f"no node {name!r} in the cluster ({[n.node for n in self.nodes]})")

    def start(self) -> None:
        """Start every node, then join the others to the first; wait until all run."""
        _each(self.nodes, _start_node, "start")
        first = self.nodes[0]
        for node in self.nodes[1:]:
            _step(node, "stop_app before joining", lambda n: n.ctl("stop_app", timeout=120))
            _step(
                node,
                f"join_cluster {first.node}",
                lambda n: n.ctl("join_cluster", first.node, timeout=120),
            )
            _step(node, "start_app after joining", lambda n: n.start_app())
        self.wait_running(CLUSTER_TIMEOUT)

    def running_nodes(self, via: PrivateRabbit | None = None) -> list[str]:
        """The cluster's running nodes, as ``via`` (a running node) sees them."""
        via = via or self._some_running()
        status = json.loads(via.ctl("cluster_status", "--formatter", "json", timeout=60))
        return sorted(status.get("running_nodes", []))

    def wait_running(self, timeout: float) -> None:
        """Wait until every node runs and sees all the others."""
        wanted = sorted(node.node for node in self.nodes)
        deadline = time.monotonic() + timeout
        seen: list[str] | str = []
        while time.monotonic() < deadline:
            try:
                seen = self.running_nodes()
                if seen == wanted:
                    return
            except (RuntimeError, ValueError) as exc:
                seen = str(exc).strip().splitlines()[-1:][0] if str(exc).strip() else repr(exc)
            time.sleep(1.0)
        raise ClusterError(
            f"the cluster did not have all {len(wanted)} nodes running within"
            f" {timeout:g}s: last saw {seen}, wanted {wanted}"
        )

    def kill(self, node: PrivateRabbit) -> None:
        """SIGKILL the node's Erlang VM, as a crash or the OOM killer would."""
        pid = int(node.pid_file.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.node} (pid {pid}) still alive 30 s after SIGKILL")
            time.sleep(0.05)
        # A stale pid file would let `rabbitmqctl wait` watch the dead VM on restart.
        node.pid_file.unlink(missing_ok=True)

    def restart(self, node: PrivateRabbit) -> None:
        """Start a killed node again (its data survived) and wait until it has rejoined."""
        _step(node, "restart", _start_node)
        self.wait_running(CLUSTER_TIMEOUT)

    def queues(self, vhost: str = "/") -> dict[str, dict[str, object]]:
        """Each quorum queue's ``leader``, ``members`` and ``online`` members, by name."""
        # Right after a node's restart (its replicas recovering, an election on) a
        # listing may wait on a queue and time out: ask again, a few times.
        failures = []
        for _ in range(QUERY_ATTEMPTS):
            try:
                out = self._some_running().ctl(
                    "list_queues", "-p", vhost, "name", "type", "leader", "members", "online",
                    "--formatter", "json", "--timeout", "45", timeout=90,
                )  # fmt: skip
                return {row["name"]: row for row in json.loads(out)}
            except (RuntimeError, ValueError) as exc:
                failures.append(str(exc).strip().splitlines()[0])
                time.sleep(2.0)
        raise ClusterError(f"list_queues failed {QUERY_ATTEMPTS} times: {failures}")

    def leader_of(self, queue: str, vhost: str = "/") -> PrivateRabbit:
        row = self.queues(vhost).get(queue)
        if row is None:
            raise ClusterError(f"no queue {queue!r} on the cluster")
        return self.node_named(str(row["leader"]))

    def _some_running(self) -> PrivateRabbit:
        for node in self.nodes:
            if node.pid_file.exists():
                return node
        raise ClusterError("no node of the cluster is running")

    def destroy(self, keep_logs: Path | None = None) -> None:
        """SIGKILL every node (no graceful stop: the cluster's data goes with it) and
        delete its files, first copying the nodes' logs into ``keep_logs`` if given."""
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                self.kill(node)
        if keep_logs is not None:
            for n, node in enumerate(self.nodes, 1):
                with contextlib.suppress(OSError):
                    shutil.copytree(node.base / "log", keep_logs / f"node{n}-{node.port}")
        shutil.rmtree(self.base, ignore_errors=True)


def _start_node(node: PrivateRabbit) -> None:
    node.start()


def _step(node: PrivateRabbit, what: str, action: Callable[[PrivateRabbit], T]) -> T:
    try:
        return action(node)
    except RuntimeError as exc:
        log = node.base / "log"
        raise ClusterError(f"{node.node}: {what} failed (its logs: {log}): {exc}") from exc


def _each(nodes: list[PrivateRabbit], action: Callable[[PrivateRabbit], None], what: str) -> None:
    """Run ``action`` on every node at once (each start is mostly waiting)."""
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        futures = [pool.submit(_step, node, what, action) for node in nodes]
        for future in futures:
            future.result()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (not reaped yet) counts as gone: it holds no ports and runs nothing.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    return True


@pytest.fixture(scope="module")
def private_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """A running three-node RabbitMQ cluster that only this module uses; the nodes' logs
    are kept in pytest's temporary directory (``cluster-logs*``, named by AMQP port)."""
    sbin = rabbit_sbin()
    if sbin is None:
        unavailable("a private RabbitMQ cluster", "rabbitmq-server and rabbitmqctl are missing")
    assert sbin is not None
    cluster = PrivateCluster(sbin, Path(tempfile.mkdtemp(prefix="taskq-fault-cluster-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy(keep_logs=tmp_path_factory.mktemp("cluster-logs"))
