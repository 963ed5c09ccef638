"""What keeps the unit layer off services: outbound network connections refused.

``tests/unit/conftest.py`` applies it to every unit test. A refusal is a
``ConnectionRefusedError`` (what the drivers expect of a server that is not there)
and is recorded, so code that swallows it and retries still fails its test.
Subprocesses a test starts are other processes: not guarded.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

SERVICES_ELSEWHERE = (
    "unit tests get no services; a test that needs {what} belongs in"
    " tests/integration (or tests/faults, tests/browser)"
)


class NetworkRefused(ConnectionRefusedError):
    """A unit test tried to open a network connection."""


def refuse_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse TCP connections (IPv4 and IPv6) until ``monkeypatch`` is undone; returns the
    list where each address tried is recorded."""
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
    return attempts
