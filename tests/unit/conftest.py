"""The unit layer: no Postgres, no RabbitMQ, no network; the whole layer runs in seconds.

Two guards keep it so. The service fixtures of ``tests/conftest.py`` are replaced
by ones that fail at once, naming the layer a test that wants them belongs in. And
every test runs with outbound network connections refused: a unit test that
reaches for a socket (``asyncpg.connect``, ``aio_pika.connect``, an HTTP client)
fails, even when the code under test catches the error and retries.
Subprocesses a test starts are not guarded (they are other processes).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

SERVICES_ELSEWHERE = (
    "unit tests get no services; a test that needs {what} belongs in"
    " tests/integration (or tests/faults, tests/browser)"
)


class NetworkRefused(ConnectionRefusedError):
    """A unit test tried to open a network connection."""


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    pytest.fail(SERVICES_ELSEWHERE.format(what="Postgres"))


@pytest.fixture(scope="session")
def amqp_url() -> str:
    pytest.fail(SERVICES_ELSEWHERE.format(what="RabbitMQ"))


@pytest.fixture(scope="session")
def management_url() -> str:
    pytest.fail(SERVICES_ELSEWHERE.format(what="the RabbitMQ management API"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse every connection to a network address; fail the test if one was tried.

    The refusal is a ``ConnectionRefusedError`` (what the drivers expect of a
    server that is not there), and it is recorded: code that swallows it and
    retries still fails the test at teardown.
    """
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(repr(address))
            raise NetworkRefused(f"{SERVICES_ELSEWHERE.format(what='the network')}: {address}")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    if attempts:
        pytest.fail(
            f"a unit test tried to connect to {', '.join(attempts)}: "
            + SERVICES_ELSEWHERE.format(what="the network")
        )
