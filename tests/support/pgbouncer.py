"""A private PgBouncer in transaction pooling mode, in front of the tests' Postgres
(and of the benchmark's: ``scripts/bench --pgbouncer`` starts one with this class).

Started from the machine's installed binary (Debian's ``pgbouncer`` package, 1.18)
on a free port, with its configuration, log and pid file in a temporary
directory, and stopped (by its own pid) at the end of the session. It serves
every database of the Postgres it points at (a ``*`` entry), authenticates
nobody (``auth_type = trust``, as the tests' Postgres does) and lends a server
connection per transaction. Its admin console (the ``pgbouncer`` database)
answers ``SHOW`` and ``RECONNECT``.

A missing binary skips the tests that need it locally and fails them under ``CI``
(``scripts/test`` installs the package when it can).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from .services import free_port, unavailable

START_TIMEOUT = 30.0
# Server connections per database and user: fewer than the clients the tests open
# (a worker's pool, the API's, the harness's), so clients do share them.
POOL_SIZE = 8
# A database entry whose pool holds a single server connection, for the probes that
# show what transaction pooling does to session state (see test_pgbouncer).
PROBE_DATABASE = "taskq_probe"


class PrivateBouncer:
    """A PgBouncer process of its own: :meth:`start` once, :meth:`stop` at the end."""

    def __init__(
        self, binary: str, base: Path, server_url: str, *, pool_size: int = POOL_SIZE
    ) -> None:
        self.binary = binary
        self.pool_size = pool_size
        self.base = base
        self.port = free_port()
        parts = urlsplit(server_url)
        self.user = parts.username or "postgres"
        self._server = (parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.strip("/"))
        self.log = base / "pgbouncer.log"
        self.process: subprocess.Popen[bytes] | None = None
        # PgBouncer refuses to run as root: it switches to the postgres user itself.
        self._as_postgres = os.geteuid() == 0

    def url(self, database: str) -> str:
        """The URL of ``database`` through this bouncer."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def via(self, url: str) -> str:
        """``url`` (of the Postgres behind) rewritten to reach it through this bouncer."""
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}"))

    @property
    def admin_url(self) -> str:
        return self.url("pgbouncer")

    def _write_config(self) -> Path:
        host, port, maintenance = self._server
        (self.base / "userlist.txt").write_text(f'"{self.user}" ""\n')
        config = self.base / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"{PROBE_DATABASE} = host={host} port={port} dbname={maintenance} pool_size=1\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            "unix_socket_dir =\n"
            f"logfile = {self.log}\npidfile = {self.base / 'pgbouncer.pid'}\n"
            f"auth_type = trust\nauth_file = {self.base / 'userlist.txt'}\n"
            f"admin_users = {self.user}\nstats_users = {self.user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 1000\n"
            # Server connections go back to the pool without a reset (the default
            # in transaction mode): whatever a session leaves, the next client sees.
            "server_reset_query =\n"
            "log_connections = 0\nlog_disconnections = 0\n"
        )
        return config

    def start(self) -> None:
        config = self._write_config()
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
            for path in self.base.iterdir():
                shutil.chown(path, "postgres", "postgres")
        self.process = subprocess.Popen(
            [self.binary, *(["-u", "postgres"] if self._as_postgres else []), str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start; its log:\n{self.log_text()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


def pgbouncer_binary() -> str | None:
    for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("pgbouncer")


@pytest.fixture(scope="session")
def pgbouncer(postgres_server_url: str) -> Iterator[PrivateBouncer]:
    """A running PgBouncer (transaction pooling) in front of the tests' Postgres."""
    binary = pgbouncer_binary()
    if binary is None:
        unavailable(
            "PgBouncer", "the pgbouncer binary is not installed (apt-get install pgbouncer)"
        )
    assert binary is not None
    bouncer = PrivateBouncer(
        binary, Path(tempfile.mkdtemp(prefix="taskq-pgbouncer-")), postgres_server_url
    )
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
