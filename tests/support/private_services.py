"""Disposable Postgres and RabbitMQ servers of the tests' own, for the faults that restart them.

The machine's shared Postgres (5432) and RabbitMQ (5672) serve everyone's tests
at once, so no test may stop them. The restart scenarios instead start a
*private* RabbitMQ node and a *private* Postgres cluster from the same
installed binaries (the real servers, not fakes), on free ports, with all
their files in a temporary directory, and restart those. Each lives for the
test session and is stopped and deleted at its end, even after a failure.

Binaries are looked up in the usual Debian places (``/usr/lib/postgresql/*/bin``,
``/usr/lib/rabbitmq/bin``), then on ``PATH``. If they are missing the tests
that need them are skipped locally and fail under ``CI=true``. Running as
root, the Postgres programs run as the ``postgres`` user (Postgres refuses
root); RabbitMQ runs as the current user with its own Erlang cookie.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .services import free_port, unavailable

START_TIMEOUT = 120.0


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60.0) -> str:
    """Run a command; fail with its output if it does not succeed."""
    try:
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(args)} did not finish within {timeout:g}s") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def _find(name: str, patterns: list[str]) -> str | None:
    for pattern in patterns:
        for path in sorted(glob.glob(pattern), reverse=True):  # the newest version first
            if os.access(path, os.X_OK):
                return path
    return shutil.which(name)


class PrivatePostgres:
    """A Postgres cluster in ``base``: :meth:`init` once, then :meth:`start` and :meth:`stop`."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def server_url(self) -> str:
        """The maintenance database's URL (trust authentication, user postgres)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, program: str, *args: str, timeout: float = 60.0) -> str:
        return _run([*self._as_postgres, str(self.bindir / program), *args], timeout=timeout)

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\nfsync = off\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
            )

    def start(self) -> None:
        log = str(self.base / "postgres.log")
        self._pg("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", "60", "start", timeout=90)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back sessions; ``immediate``: like a crash)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", timeout=90)

    def running(self) -> bool:
        try:
            self._pg("pg_ctl", "-D", str(self.data), "status")
        except RuntimeError:
            return False
        return True

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of its own: own node name, ports, Erlang cookie, data and logs."""

    def __init__(
        self, sbin: Path, base: Path, *, cookie: str | None = None, erl_args: str = ""
    ) -> None:
        self.sbin = sbin
        self.base = base
        self.node = f"taskq-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid_file = base / "rabbit.pid"
        if cookie is not None:  # nodes of one cluster (and their CLI) share one cookie
            path = base / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
            "disk_free_limit.absolute = 10MB\n"
        )
        # An empty env file, so the machine's rabbitmq-env.conf (NODENAME=...) is not read.
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(base),  # the Erlang cookie of this node and its CLI
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        }
        if erl_args:
            self.env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = erl_args

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        return _run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.node, *args], env=self.env, timeout=timeout
        )

    def start(self) -> None:
        """Start the node (the whole Erlang VM) and wait until it accepts connections."""
        _run([str(self.sbin / "rabbitmq-server"), "-detached"], env=self.env)
        self.ctl("wait", str(self.pid_file), "--timeout", str(int(START_TIMEOUT)), timeout=150)
        self.wait_for_port()

    def wait_for_port(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ {self.node} does not listen on {self.port}")
            time.sleep(0.2)

    def stop_app(self) -> None:
        """Stop the RabbitMQ application; the Erlang VM stays up."""
        self.ctl("stop_app", timeout=90)

    def start_app(self) -> None:
        self.ctl("start_app", timeout=150)
        self.wait_for_port()

    def stop(self) -> None:
        """Stop the whole node, as a server shutdown does."""
        self.ctl("stop", str(self.pid_file), timeout=90)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.ctl("stop", str(self.pid_file), timeout=60)
        # Whatever did not stop gracefully is killed, by its own pid only.
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def _postgres_bindir() -> Path | None:
    initdb = _find("initdb", ["/usr/lib/postgresql/*/bin/initdb", "/usr/local/pgsql/bin/initdb"])
    if initdb is None:
        return None
    bindir = Path(initdb).parent
    return bindir if (bindir / "pg_ctl").exists() else None


def rabbit_sbin() -> Path | None:
    server = _find("rabbitmq-server", ["/usr/lib/rabbitmq/bin/rabbitmq-server"])
    if server is None:
        return None
    sbin = Path(server).parent
    return sbin if (sbin / "rabbitmqctl").exists() else None


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running Postgres cluster that only this session uses, free to stop and restart."""
    bindir = _postgres_bindir()
    if bindir is None:
        unavailable("a private Postgres", "initdb and pg_ctl are not installed")
    assert bindir is not None
    server = PrivatePostgres(bindir, Path(tempfile.mkdtemp(prefix="taskq-fault-pg-")))
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A running RabbitMQ node that only this session uses, free to stop and restart."""
    sbin = rabbit_sbin()
    if sbin is None:
        unavailable("a private RabbitMQ", "rabbitmq-server and rabbitmqctl are not installed")
    assert sbin is not None
    node = PrivateRabbit(sbin, Path(tempfile.mkdtemp(prefix="taskq-fault-rmq-")))
    try:
        node.start()
        yield node
    finally:
        node.destroy()
