"""The unit layer's guards: its tests are marked ``unit``, get no service fixtures and
cannot open a network connection (``tests/unit/conftest.py``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import asyncpg
import pytest

from tests.support.isolation import NetworkRefused


@pytest.fixture
def listening() -> Iterator[tuple[str, int]]:
    """A local TCP socket that would accept a connection (binding needs no connect)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()


def test_unit_tests_are_marked_unit_only(request: pytest.FixtureRequest) -> None:
    names = {mark.name for mark in request.node.iter_markers()}
    assert "unit" in names
    assert not names & {"integration", "fault", "browser"}


@pytest.mark.parametrize("fixture", ["postgres_server_url", "amqp_url", "management_url"])
def test_service_fixtures_fail_at_once(request: pytest.FixtureRequest, fixture: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="belongs in tests/integration"):
        request.getfixturevalue(fixture)


def test_a_connection_is_refused_and_recorded(
    listening: tuple[str, int], no_network: list[str]
) -> None:
    with socket.socket() as client, pytest.raises(NetworkRefused, match="unit tests get no"):
        client.connect(listening)
    assert no_network == [repr(listening)]
    no_network.clear()  # seen: do not fail this test at teardown


async def test_a_driver_connecting_is_refused_and_recorded(
    listening: tuple[str, int], no_network: list[str]
) -> None:
    host, port = listening
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)
    with pytest.raises(OSError):
        await asyncpg.connect(f"postgresql://x@{host}:{port}/x", timeout=2)
    assert no_network and set(no_network) == {repr(listening)}
    no_network.clear()


def test_local_sockets_that_need_no_network_still_work() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        assert right.recv(1) == b"x"
