"""``taskq worker --processes N``: one supervisor process keeping N worker processes running.

CPU-bound handlers are limited to one core per process by the GIL; N worker
processes use N cores. The supervisor imports no handler code: each child is
``python -m taskq worker`` with the supervisor's own arguments (``--processes 1``
appended, and ``--metrics-port P+i`` for child ``i`` when ``--metrics-port P``
is given), so each child is an ordinary worker with its own worker id.

Each child gets one end of a Unix socket pair (``--supervisor-fd``). It writes
a byte on it once its worker has started, and stops gracefully when it reads
the end of the stream: the supervisor is gone, even if it was SIGKILLed and
could not say so. No child runs on as an orphan.

Restarts (each end logged with its exit code or signal):

- a child that exits 2 (a usage or configuration error: the handler module does
  not import, an unknown queue) is not restarted: the supervisor stops the
  others and exits 2;
- a child that ends before its first start in a slot is complete (the database
  is unreachable, a work queue is missing) stops the supervisor with that code:
  it cannot start its children, and says so at once rather than looping;
- any other end (a crash, a signal, ``sys.exit`` from a handler) is restarted
  after a backoff: 1 s, doubling up to 30 s while the child dies within 30 s of
  its start, so a child that dies at once does not spin the CPU.

SIGTERM or SIGINT stops every child gracefully (they are sent SIGTERM, as one
worker would be, each then gets ``TASKQ_WORKER_SHUTDOWN_GRACE``); a second
SIGINT is forwarded as SIGINT, which cuts their grace short. A child still
running ``KILL_AFTER`` seconds past the grace is killed. The supervisor exits
0 after a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from taskq.errors import ConfigError
from taskq.settings import Settings

log = logging.getLogger("taskq.supervisor")

# Exit code of a child (and of the supervisor) for a usage or configuration error.
USAGE_ERROR = 2
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
# A child that ran this long before it ended is restarted at once after FIRST_RESTART_DELAY.
STABLE_AFTER = 30.0
# Seconds past the shutdown grace before a child that has not stopped is killed.
KILL_AFTER = 30.0
_READY = b"r"


def restart_delay(failures: int) -> float:
    """Seconds to wait before the restart that follows ``failures`` quick deaths in a row."""
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2.0 ** max(0, failures - 1))


def describe_exit(returncode: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def child_argv(argv: Sequence[str], index: int, fd: int, metrics_port: int | None) -> list[str]:
    """The ``taskq`` arguments of child ``index``: the supervisor's, with the child's own last.

    argparse keeps the last value of a repeated option, so appending overrides
    the supervisor's ``--processes`` and ``--metrics-port``.
    """
    extra = ["--processes", "1", "--supervisor-fd", str(fd)]
    if metrics_port is not None:
        extra += ["--metrics-port", str(metrics_port + index if metrics_port else 0)]
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)
    return [*args[:cut], *extra, *args[cut:]]


@dataclass
class Child:
    """One worker process and the supervisor's end of its control socket."""

    index: int
    process: asyncio.subprocess.Process
    control: socket.socket
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


class Supervisor:
    """Runs ``processes`` worker processes until stopped; see the module docstring.

    Args:
        argv: the ``taskq`` arguments the supervisor was started with
            (``worker MODULE ...``).
        processes: how many worker processes to keep running.
        grace: the workers' shutdown grace (``TASKQ_WORKER_SHUTDOWN_GRACE``).
        metrics_port: the first child's metrics port (child ``i`` serves ``port + i``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        processes: int,
        *,
        grace: float,
        metrics_port: int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.processes = processes
        self.grace = grace
        self.metrics_port = metrics_port
        self.children: dict[int, Child] = {}
        self._stop = asyncio.Event()
        self._code: int | None = None  # set by a failure that stops the supervisor
        self._killed = False

    async def run(self) -> int:
        """Start the children, keep them running until a signal, stop them; the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("supervisor %d starting %d worker processes", os.getpid(), self.processes)
        slots = [asyncio.create_task(self._keep(i)) for i in range(self.processes)]
        killer = asyncio.create_task(self._kill_late())
        try:
            await asyncio.gather(*slots)
        finally:
            killer.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._code is not None:
            return self._code
        log.info("supervisor %d stopped", os.getpid())
        return 1 if self._killed else 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            log.info("supervisor got %s: stopping the workers", sig.name)
            self.stop()
        elif sig == signal.SIGINT:
            # A second Ctrl-C hurries the workers, as it does one worker; a
            # repeated SIGTERM does not.
            log.info("supervisor got SIGINT again: the workers stop now")
            for child in self.children.values():
                child.signal(signal.SIGINT)

    def stop(self, code: int | None = None) -> None:
        """Stop every child gracefully; ``code`` (a failure) becomes the exit code."""
        if code is not None and self._code is None:
            self._code = code
        self._stop.set()
        for child in self.children.values():
            child.signal(signal.SIGTERM)

    async def _kill_late(self) -> None:
        await self._stop.wait()
        await asyncio.sleep(self.grace + KILL_AFTER)
        for child in self.children.values():
            if child.process.returncode is None:
                log.error(
                    "worker process %d (pid %d) did not stop in time: killing it",
                    child.index,
                    child.pid,
                )
                self._killed = True
                child.signal(signal.SIGKILL)

    async def _keep(self, index: int) -> None:
        """Keep slot ``index`` running a child until the supervisor stops."""
        failures = 0
        started_once = False
        while not self._stop.is_set():
            child = await self._spawn(index)
            code = await self._watch(child)
            ended = describe_exit(code)
            if self._stop.is_set():
                log.info("worker process %d (pid %d) %s", index, child.pid, ended)
                return
            if code == USAGE_ERROR:
                log.error(
                    "worker process %d (pid %d) %s (usage or configuration): stopping",
                    index,
                    child.pid,
                    ended,
                )
                self.stop(USAGE_ERROR)
                return
            if not started_once and not child.ready:
                log.error(
                    "worker process %d (pid %d) %s before it started: stopping",
                    index,
                    child.pid,
                    ended,
                )
                self.stop(code if code > 0 else 1)
                return
            started_once = started_once or child.ready
            lived = time.monotonic() - child.started_at
            failures = 1 if lived >= STABLE_AFTER and child.ready else failures + 1
            delay = restart_delay(failures)
            log.warning(
                "worker process %d (pid %d) %s after %.1f s; restarting it in %.1f s",
                index, child.pid, ended, lived, delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _spawn(self, index: int) -> Child:
        ours, theirs = socket.socketpair()
        try:
            argv = child_argv(self.argv, index, theirs.fileno(), self.metrics_port)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "taskq", *argv, pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        child = Child(index, process, ours)
        self.children[index] = child
        if self._stop.is_set():  # a signal came while it was being spawned
            child.signal(signal.SIGTERM)
        log.info("worker process %d started: pid %d", index, child.pid)
        return child

    async def _watch(self, child: Child) -> int:
        """Wait until the child exits, noting when it says it is ready; its return code."""
        reader = asyncio.create_task(self._read_ready(child))
        try:
            code = await child.process.wait()
            # Its end of the socket closed with it: the reader reaches the end of
            # the stream, reading a ready byte the child sent just before it died.
            await asyncio.wait([reader], timeout=5.0)
            return code
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            child.control.close()

    async def _read_ready(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(child.control, 64):
                if _READY in data and not child.ready:
                    child.ready = True
                    log.info("worker process %d (pid %d) is ready", child.index, child.pid)


async def supervise(
    settings: Settings, argv: Sequence[str], processes: int, metrics_port: int | None
) -> int:
    """Run ``processes`` workers under a :class:`Supervisor`; the exit code.

    Raises:
        ConfigError: if the metrics ports of the children do not fit below 65536.
    """
    if metrics_port and metrics_port + processes - 1 > 65535:
        raise ConfigError(
            "--metrics-port",
            f"{processes} processes serve {metrics_port}..{metrics_port + processes - 1}",
        )
    supervisor = Supervisor(
        argv, processes, grace=settings.worker_shutdown_grace, metrics_port=metrics_port
    )
    return await supervisor.run()


class SupervisorLink:
    """A child's end of its control socket, given as ``--supervisor-fd``.

    Args:
        fd: the inherited socket's file descriptor.
    """

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.set_inheritable(False)  # not into processes a handler starts
        self._sock.setblocking(False)
        self._watch: asyncio.Task[None] | None = None

    def watch(self, stop: asyncio.Event) -> None:
        """Set ``stop`` when the supervisor is gone (its end of the socket closed)."""
        self._watch = asyncio.create_task(self._wait_for_eof(stop.set))

    async def _wait_for_eof(self, stop: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while await loop.sock_recv(self._sock, 64):
                pass
        log.warning("the supervisor is gone: stopping")
        stop()

    def ready(self) -> None:
        """Tell the supervisor this worker has started."""
        with contextlib.suppress(OSError):
            self._sock.send(_READY)
