"""Several AMQP URLs (a cluster's nodes): parsing ``TASKQ_AMQP_URL``, its errors, masking,
and the order in which a connection tries the nodes and moves between them."""

from __future__ import annotations

import aio_pika
import pytest
from yarl import URL

from taskq.amqp import broker
from taskq.errors import BrokerError, ConfigError
from taskq.settings import load_settings, split_amqp_urls

NODES = "amqp://app:Zq9Xw7@rmq1:5672/,amqp://app:Zq9Xw7@rmq2:5672/,amqp://app:Zq9Xw7@rmq3:5672/"


def settings_from(monkeypatch: pytest.MonkeyPatch, url: str):
    monkeypatch.setenv("TASKQ_AMQP_URL", url)
    return load_settings(_env_file=None)


def test_one_url_is_a_list_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch, "amqp://guest:guest@127.0.0.1:5672/")
    assert settings.amqp_urls == ["amqp://guest:guest@127.0.0.1:5672/"]


@pytest.mark.parametrize(
    "value",
    [
        NODES,
        NODES.replace(",", ", "),
        NODES.replace(",", ";"),  # Celery's and Kombu's separator
        " " + NODES.replace(",", " ,\n") + " ",
    ],
)
def test_a_comma_separated_list_gives_each_node(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    settings = settings_from(monkeypatch, value)
    assert settings.amqp_urls == NODES.split(",")


def test_a_comma_in_a_password_stays_in_its_url() -> None:
    assert split_amqp_urls("amqp://app:a,b@rmq1/,amqp://app:a,b@rmq2/") == [
        "amqp://app:a,b@rmq1/",
        "amqp://app:a,b@rmq2/",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amqp://app:Zq9Xw7@rmq1:5672,rmq2:5672/", "one host per URL"),
        ("amqp://app:Zq9Xw7@rmq1,rmq2/", "one host per URL"),
        ("amqp://app:Zq9Xw7@rmq1/,amqp://app:Zq9Xw7@rmq2,rmq3/", "URL 2 of 2: one host per URL"),
        ("amqp://app:Zq9Xw7@rmq1/,rmq2", "a comma after the host"),
        ("amqp://app:Zq9Xw7@rmq1/,amqp://app:Zq9Xw7@rmq2:99999/", "URL 2 of 2: the port"),
        ("amqp://app:Zq9Xw7@rmq1/,http://app:Zq9Xw7@rmq2/", "URL 2 of 2: expected amqp://"),
        ("amqp://app:Zq9/Xw7@rmq1/,amqp://app:Zq9Xw7@rmq2/", "URL 1 of 2: an '@' after"),
        ("amqp://app:Zq9Xw7@rmq1/,amqp://app:Zq9Xw7@rmq1/", "a URL is listed twice"),
    ],
)
def test_a_bad_url_in_the_list_is_named_by_its_place_never_repeated(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(monkeypatch, value)
    assert caught.value.variable == "TASKQ_AMQP_URL"
    assert message in str(caught.value), str(caught.value)
    for piece in ("Zq9", "Xw7"):
        assert piece not in str(caught.value)


def test_describe_masks_every_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch, NODES)
    described = settings.describe()["TASKQ_AMQP_URL"]
    assert described == ",".join(f"amqp://app:***@rmq{n}:5672/" for n in (1, 2, 3))
    assert "Zq9" not in repr(settings)


def test_a_connection_tries_the_nodes_in_turn_from_its_start() -> None:
    urls = ["a", "b", "c"]
    assert broker.failover_order(urls, 0) == ["a", "b", "c"]
    assert broker.failover_order(urls, 1) == ["b", "c", "a"]
    assert broker.failover_order(urls, 2) == ["c", "a", "b"]
    assert broker.failover_order(["a"]) == ["a"]


def test_connections_start_at_every_node() -> None:
    """The start is random, so a fleet's connections spread over the nodes."""
    starts = {broker.failover_order(["a", "b", "c"])[0] for _ in range(200)}
    assert starts == {"a", "b", "c"}


def test_no_url_is_an_error() -> None:
    with pytest.raises(BrokerError):
        broker.Link([], name="test")


async def test_a_robust_connection_moves_to_the_next_node_on_each_reconnection() -> None:
    nodes = tuple(URL(f"amqp://guest:guest@rmq{n}:5672/") for n in (1, 2, 3))
    connection = broker._RobustClosedOnFailure(nodes[1])
    connection.nodes = (nodes[1], nodes[2], nodes[0])
    seen = []
    for _ in range(4):
        connection._next_node()
        seen.append(connection.url.host)
    assert seen == ["rmq3", "rmq1", "rmq2", "rmq3"]


async def test_one_node_stays_where_it_is() -> None:
    url = URL("amqp://guest:guest@rmq1:5672/")
    connection = broker._RobustClosedOnFailure(url)
    connection.nodes = (url,)
    connection._next_node()
    assert connection.url == url


def test_aio_pika_still_has_the_hook_each_attempt_goes_through() -> None:
    """The node of each (re)connection attempt is chosen by overriding this private
    method of aio-pika's RobustConnection; a release that renames it must fail here."""
    name = "_RobustConnection__connect_transport"
    assert callable(getattr(aio_pika.RobustConnection, name, None))
    assert name in vars(broker._RobustClosedOnFailure)
