"""A private Postgres primary with a streaming standby, for the failover scenario.

Both are real Postgres servers from the machine's installed binaries
(:class:`~tests.support.private_services.PrivatePostgres`, each on a free port in
a temporary directory): the standby is a ``pg_basebackup -R`` copy of the
primary that streams its WAL, and the primary's ``synchronous_standby_names``
names it, so that a commit returns only once the standby has flushed it. The
scenario stops the primary (``immediate``, as a crash) and promotes the standby
(``pg_ctl promote``); taskq, given both hosts with ``target_session_attrs=read-write``,
must find the new primary by itself.

The standby has no ``synchronous_standby_names`` of its own: once promoted it is
a primary without a standby, and commits waiting for one would wait for ever.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .private_services import PrivatePostgres, _postgres_bindir
from .services import unavailable

# The standby's name, as the primary's synchronous_standby_names and
# pg_stat_replication know it (the application_name of its WAL receiver).
STANDBY_NAME = "taskq_standby"


class PrivatePair:
    """A primary and its synchronous streaming standby; :meth:`start` sets both up."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.base = base
        (base / "primary").mkdir()
        (base / "standby").mkdir()
        self.primary = PrivatePostgres(bindir, base / "primary")
        self.standby = PrivatePostgres(bindir, base / "standby")
        self._frozen: list[int] = []  # the pids freeze() stopped
        if self.primary._as_postgres:  # as root: the servers run as postgres
            for path in (base, self.primary.base, self.standby.base):
                shutil.chown(path, "postgres", "postgres")

    def url(self, database: str) -> str:
        """``database`` on whichever of the two accepts writes (libpq's multi-host URL)."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def psql(self, server: PrivatePostgres, query: str) -> str:
        """``query``'s result on ``server`` (unaligned, tuples only)."""
        return server._pg(
            "psql", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
            "-d", "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query,
        ).strip()  # fmt: skip

    def start(self) -> None:
        """initdb and start the primary, base-back it up into the standby, start that,
        then make the primary's commits wait for it."""
        self.primary.init()
        self.primary.start()
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user=postgres application_name={STANDBY_NAME}"
        )
        # -R writes standby.signal and primary_conninfo (with this application_name).
        self.standby._pg(
            "pg_basebackup", "-d", conninfo, "-D", str(self.standby.data),
            "-R", "-X", "stream", "-c", "fast", "--no-sync",
            timeout=120,
        )  # fmt: skip
        with (self.standby.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\n# the standby's own\nport = {self.standby.port}\n"
                f"unix_socket_directories = '{self.standby.base}'\n"
                "synchronous_standby_names = ''\nhot_standby = on\n"
            )
        self.standby.start()
        self.psql(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        self.psql(self.primary, "SELECT pg_reload_conf()")
        self.wait_for_sync()

    def wait_for_sync(self, timeout: float = 60.0) -> None:
        """Wait until the primary reports the standby as its synchronous standby."""
        query = (
            "SELECT sync_state FROM pg_stat_replication"
            f" WHERE application_name = '{STANDBY_NAME}' AND state = 'streaming'"
        )
        deadline = time.monotonic() + timeout
        while (state := self.psql(self.primary, query)) != "sync":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby is not synchronous within {timeout:g}s: {state!r}")
            time.sleep(0.2)

    def promote(self) -> None:
        """``pg_ctl promote`` the standby and wait until it accepts writes."""
        self.standby._pg(
            "pg_ctl", "-D", str(self.standby.data), "-w", "-t", "60", "promote", timeout=90
        )

    def _postmaster(self, server: PrivatePostgres) -> int:
        return int((server.data / "postmaster.pid").read_text().split()[0])

    def freeze(self) -> None:
        """SIGSTOP the primary's postmaster and its backends: the kernel still completes
        TCP handshakes for it, but nothing answers (a hung machine or a cut network
        look the same to a client: a connect that never completes)."""
        postmaster = self._postmaster(self.primary)
        self._frozen = [postmaster, *_children(postmaster)]
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    def destroy(self) -> None:
        self.thaw()
        for server in (self.standby, self.primary):
            with contextlib.suppress(Exception):
                server.destroy()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


@pytest.fixture
def private_pair() -> Iterator[PrivatePair]:
    """A fresh primary and synchronous standby (a failover spends them: one per test)."""
    bindir = _postgres_bindir()
    if bindir is None:
        unavailable("a private Postgres pair", "initdb, pg_ctl and pg_basebackup are not installed")
    assert bindir is not None
    if not (bindir / "pg_basebackup").exists():
        unavailable("a private Postgres pair", f"{bindir}/pg_basebackup is not installed")
    pair = PrivatePair(bindir, Path(tempfile.mkdtemp(prefix="taskq-fault-pair-")))
    try:
        pair.start()
        yield pair
    finally:
        pair.destroy()
