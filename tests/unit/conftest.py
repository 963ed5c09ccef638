"""The unit layer: no Postgres, no RabbitMQ, no network; the whole layer runs in seconds.

Two guards keep it so. The service fixtures of ``tests/conftest.py`` are replaced
by ones that fail at once, naming the layer a test that wants them belongs in. And
every test runs with outbound network connections refused
(:mod:`tests.support.isolation`): a unit test that reaches for a socket
(``asyncpg.connect``, ``aio_pika.connect``, an HTTP client) fails, even when the
code under test catches the refusal and retries.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.isolation import SERVICES_ELSEWHERE, refuse_network


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
    """Every unit test: network connections refused; one tried fails the test."""
    attempts = refuse_network(monkeypatch)
    yield attempts
    if attempts:
        pytest.fail(
            f"a unit test tried to connect to {', '.join(attempts)}: "
            + SERVICES_ELSEWHERE.format(what="the network")
        )
