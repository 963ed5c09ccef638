"""The topology plan, and a proof that the delay levels spell every delay exactly.

Pure unit tests: no broker. The routing proof runs the plan's own exchanges,
bindings and queue arguments through a small simulator of RabbitMQ's routing
(direct, fanout and topic exchanges, exchange-to-exchange bindings, and
dead-lettering on message TTL expiry), so a wrong binding or argument in
``taskq.amqp.topology.plan`` fails here, not after a 30-day wait in production.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any

import pytest

from taskq.amqp.topology import (
    RESERVED_QUEUE_NAMES,
    Binding,
    Names,
    Topology,
    delay_levels,
    delay_routing_key,
    plan,
)
from taskq.errors import DelayTooLong

QUEUES = ["critical", "high", "default", "low"]
DAY = 86400
THIRTY_DAYS = 30 * DAY

# -- names and levels ---------------------------------------------------------------------------


def test_names() -> None:
    names = Names("ns")
    assert names.namespace == "ns"
    assert names.direct == "ns.direct"
    assert names.dlx == "ns.dlx"
    assert names.dlq == "ns.dlq"
    assert names.delay_deliver == "ns.delay.deliver"
    assert names.queue("default") == "ns.default"
    assert names.delay(0) == "ns.delay.00"
    assert names.delay(3) == "ns.delay.03"
    assert names.delay(21) == "ns.delay.21"


def test_dotted_namespace_prefixes_every_name() -> None:
    topology = plan("my.app", QUEUES)
    every = [e.name for e in topology.exchanges] + [q.name for q in topology.queues]
    assert all(name.startswith("my.app.") for name in every)


@pytest.mark.parametrize(
    ("max_delay", "levels"),
    [
        (0.5, 1),
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 3),
        (1.5, 2),
        (3600, 12),
        (DAY, 17),
        (THIRTY_DAYS, 22),
        (2**22 - 1, 22),
        (2**22, 23),
    ],
)
def test_delay_levels(max_delay: float, levels: int) -> None:
    assert delay_levels(max_delay) == levels


def test_delay_levels_are_the_fewest_that_spell_the_maximum() -> None:
    for max_delay in range(1, 5000):
        levels = delay_levels(max_delay)
        assert max_delay < 2**levels, max_delay
        assert max_delay >= 2 ** (levels - 1), max_delay


def test_thirty_days_need_22_levels() -> None:
    topology = plan("ns", QUEUES)
    assert topology.levels == 22
    assert topology.delay_entry == "ns.delay.21"
    delay_queues = [q for q in topology.queues if q.name.startswith("ns.delay.")]
    assert [q.name for q in delay_queues] == [f"ns.delay.{level:02d}" for level in range(22)]


# -- routing keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "levels", "key"),
    [
        (13, 5, "0.1.1.0.1.default"),
        (0, 3, "0.0.0.default"),
        (1, 3, "0.0.1.default"),
        (4, 3, "1.0.0.default"),
        (7, 3, "1.1.1.default"),
        (0, 1, "0.default"),
        (1, 1, "1.default"),
        (THIRTY_DAYS, 22, "1.0.0.1.1.1.1.0.0.0.1.1.0.1.0.0.0.0.0.0.0.0.default"),
    ],
)
def test_delay_routing_key(seconds: int, levels: int, key: str) -> None:
    assert delay_routing_key(seconds, "default", levels) == key


def test_delay_routing_key_rejects_negative_delays() -> None:
    with pytest.raises(ValueError, match="negative"):
        delay_routing_key(-1, "default", 5)


@pytest.mark.parametrize(("seconds", "levels"), [(8, 3), (2, 1), (2**22, 22), (10**9, 22)])
def test_delay_routing_key_rejects_delays_the_levels_cannot_spell(
    seconds: int, levels: int
) -> None:
    with pytest.raises(DelayTooLong, match=f"{seconds}s"):
        delay_routing_key(seconds, "default", levels)


def covering_delays(levels: int, maximum: int, low: int) -> list[int]:
    """Delays up to ``maximum`` that put each level's bit beside every other's: every
    combination of the ``low`` lowest levels; every combination of the levels above them,
    each under 32 patterns of the low ones (none, all and 30 drawn); every power of two
    with its neighbours; and ``maximum`` itself.

    A level's word depends on its own bit alone, so what breaks a spelling or a route
    (a word short, one level's bit read for another's, a carry) shows in some pair of
    levels; the full range one by one (2.6 M keys for thirty days) took half the unit
    layer's time for nothing more.
    """
    rng = random.Random(levels)
    lows = {0, (1 << low) - 1} | {rng.randrange(1 << low) for _ in range(30)}
    delays = set(range(1 << low))
    delays |= {high << low | bits for high in range(1, (maximum >> low) + 1) for bits in lows}
    delays |= {2**bit + step for bit in range(levels) for step in (-1, 0, 1)}
    return sorted({d for d in delays if 0 <= d < maximum} | {maximum})


def test_the_covering_delays_hold_every_pair_of_levels() -> None:
    """Each two levels' bits, in every combination a delay up to thirty days can have,
    in some covering delay (so no level's word is checked beside one value of another)."""
    levels = delay_levels(THIRTY_DAYS)
    delays = covering_delays(levels, THIRTY_DAYS, 16)
    assert delays[-1] == THIRTY_DAYS and len(delays) == len(set(delays))
    for a in range(levels):
        for b in range(a + 1, levels):
            mask = 1 << a | 1 << b
            for want in (0, 1 << a, 1 << b, mask):
                # From the top down: delays with a high level set are the fewer.
                if want <= THIRTY_DAYS:
                    assert any(d & mask == want for d in reversed(delays)), (a, b, want)


def test_every_delay_up_to_thirty_days_is_spelled_in_binary() -> None:
    """``int(bits, 2) == d`` for the covering delays of [0, 30 days], one word per level."""
    levels = delay_levels(THIRTY_DAYS)
    delays = covering_delays(levels, THIRTY_DAYS, 16)
    keys = map(delay_routing_key, delays, repeat("q"), repeat(levels))
    # Each key is "b.b.….b.q": one bit per level at the even offsets, a dot after
    # each (which, with the final "q", also pins the length), then the queue.
    dots = "." * levels
    wrong = [
        d
        for d, key in zip(delays, keys, strict=True)
        if key[1::2] != dots or key[-1] != "q" or int(key[0 : 2 * levels : 2], 2) != d
    ]
    assert wrong == []


# -- plan contents ------------------------------------------------------------------------------


def queue_args(topology: Topology) -> dict[str, dict[str, Any]]:
    return {q.name: q.arguments for q in topology.queues}


def test_quorum_work_queues() -> None:
    topology = plan("ns", QUEUES, delivery_limit=7)
    args = queue_args(topology)
    for queue in QUEUES:
        assert args[f"ns.{queue}"] == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 7,
            "x-dead-letter-exchange": "ns.dlx",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


def test_default_delivery_limit_is_explicit() -> None:
    assert queue_args(plan("ns", ["default"]))["ns.default"]["x-delivery-limit"] == 20


def test_classic_work_queues() -> None:
    topology = plan("ns", QUEUES, queue_type="classic")
    args = queue_args(topology)
    for queue in QUEUES:
        assert args[f"ns.{queue}"] == {
            "x-queue-type": "classic",
            "x-dead-letter-exchange": "ns.dlx",
        }
    assert all(a["x-queue-type"] == "classic" for a in args.values())


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_delay_queues_hold_one_ttl_each_and_dead_letter_one_level_down(queue_type: Any) -> None:
    topology = plan("ns", QUEUES, queue_type=queue_type, max_delay=3600)
    args = queue_args(topology)
    assert topology.levels == 12
    for level in range(12):
        expected: dict[str, Any] = {
            "x-queue-type": queue_type,
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": f"ns.delay.{level - 1:02d}" if level else "ns.delay.deliver",
        }
        if queue_type == "quorum":
            expected["x-dead-letter-strategy"] = "at-least-once"
            expected["x-overflow"] = "reject-publish"
        assert args[f"ns.delay.{level:02d}"] == expected
        # The routing key must survive dead-lettering unchanged.
        assert "x-dead-letter-routing-key" not in args[f"ns.delay.{level:02d}"]


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_dead_letter_queue(queue_type: Any) -> None:
    topology = plan("ns", QUEUES, queue_type=queue_type)
    assert queue_args(topology)["ns.dlq"] == {"x-queue-type": queue_type}


def test_exchanges() -> None:
    topology = plan("ns", QUEUES, max_delay=7)
    assert [(e.name, e.type) for e in topology.exchanges] == [
        ("ns.direct", "direct"),
        ("ns.dlx", "fanout"),
        ("ns.delay.deliver", "topic"),
        ("ns.delay.00", "topic"),
        ("ns.delay.01", "topic"),
        ("ns.delay.02", "topic"),
    ]


def test_queues_in_declaration_order() -> None:
    topology = plan("ns", ["a", "b"], max_delay=3)
    assert [q.name for q in topology.queues] == [
        "ns.a",
        "ns.b",
        "ns.dlq",
        "ns.delay.00",
        "ns.delay.01",
    ]
    assert all(q.purpose for q in topology.queues)


def test_bindings() -> None:
    topology = plan("ns", ["a", "b"], max_delay=7)
    assert set(topology.bindings) == {
        Binding("ns.direct", "ns.a", "queue", "a"),
        Binding("ns.direct", "ns.b", "queue", "b"),
        Binding("ns.dlx", "ns.dlq", "queue", ""),
        Binding("ns.delay.02", "ns.delay.02", "queue", "1.#"),
        Binding("ns.delay.02", "ns.delay.01", "exchange", "0.#"),
        Binding("ns.delay.01", "ns.delay.01", "queue", "*.1.#"),
        Binding("ns.delay.01", "ns.delay.00", "exchange", "*.0.#"),
        Binding("ns.delay.00", "ns.delay.00", "queue", "*.*.1.#"),
        Binding("ns.delay.00", "ns.delay.deliver", "exchange", "*.*.0.#"),
        Binding("ns.delay.deliver", "ns.a", "queue", "#.a"),
        Binding("ns.delay.deliver", "ns.b", "queue", "#.b"),
    }
    assert len(topology.bindings) == len(set(topology.bindings))


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_every_binding_joins_planned_objects(queue_type: Any) -> None:
    topology = plan("ns", QUEUES, queue_type=queue_type)
    exchanges = {e.name for e in topology.exchanges}
    queues = {q.name for q in topology.queues}
    assert len(exchanges) == len(topology.exchanges)
    assert len(queues) == len(topology.queues)
    for binding in topology.bindings:
        assert binding.source in exchanges, binding
        targets = queues if binding.destination_type == "queue" else exchanges
        assert binding.destination in targets, binding
    for queue in topology.queues:
        dlx = queue.arguments.get("x-dead-letter-exchange")
        assert dlx is None or dlx in exchanges, queue


@pytest.mark.parametrize("reserved", sorted(RESERVED_QUEUE_NAMES))
def test_reserved_queue_names_are_refused(reserved: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        plan("ns", ["default", reserved])


# -- the routing proof --------------------------------------------------------------------------

# Called with the routing key dotted as topic_regex wants it: ".w1.w2".
Matcher = Callable[[str], object]


def _any_key(dotted_key: str) -> bool:
    return True


def topic_regex(pattern: str) -> re.Pattern[str]:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words.

    The regex matches the key with a dot before every word (``a.b`` -> ``.a.b``), so
    ``#`` is simply "any number of dot-words" and needs no special case at the ends.
    """
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            parts.append(r"\." + re.escape(word))
    return re.compile("".join(parts))


def topic_matches(pattern: str, key: str) -> bool:
    return topic_regex(pattern).fullmatch("." + key) is not None


@dataclass(frozen=True)
class Arrival:
    queue: str
    ttl_ms: int
    path: tuple[str, ...]  # the delay queues passed through, in order


class SimulatedBroker:
    """Routes messages through a plan the way RabbitMQ would, without waiting."""

    def __init__(self, topology: Topology) -> None:
        self.exchange_types = {e.name: e.type for e in topology.exchanges}
        self.queue_args = {q.name: q.arguments for q in topology.queues}
        self.bindings: dict[str, list[tuple[Matcher, str, str]]] = {
            name: [] for name in self.exchange_types
        }
        for b in topology.bindings:
            kind = self.exchange_types[b.source]
            matcher: Matcher
            if kind == "topic":
                matcher = topic_regex(b.routing_key).fullmatch
            elif kind == "direct":
                matcher = ("." + b.routing_key).__eq__
            else:  # fanout
                matcher = _any_key
            self.bindings[b.source].append((matcher, b.destination, b.destination_type))

    def route(self, exchange: str, key: str) -> set[str]:
        """The queues one publish reaches; each queue gets the message at most once."""
        dotted = "." + key
        queues: set[str] = set()
        seen = {exchange}
        pending = [exchange]
        while pending:
            source = pending.pop()
            for matches, destination, destination_type in self.bindings[source]:
                if not matches(dotted):
                    continue
                if destination_type == "queue":
                    queues.add(destination)
                elif destination not in seen:
                    seen.add(destination)
                    pending.append(destination)
        return queues

    def deliver(self, exchange: str, key: str, max_hops: int = 64) -> list[Arrival]:
        """Publish, then let every queue with a message TTL expire it and dead-letter it on."""
        arrivals = []
        pending: list[tuple[str, str, int, tuple[str, ...]]] = [(exchange, key, 0, ())]
        while pending:
            exchange, key, ttl, path = pending.pop()
            assert len(path) <= max_hops, f"dead-letter loop: {path}"
            for queue in self.route(exchange, key):
                args = self.queue_args[queue]
                if "x-message-ttl" in args:
                    onward = args["x-dead-letter-exchange"]
                    onward_key = args.get("x-dead-letter-routing-key", key)
                    hold = args["x-message-ttl"]
                    pending.append((onward, onward_key, ttl + hold, (*path, queue)))
                else:
                    arrivals.append(Arrival(queue, ttl, path))
        return arrivals


def assert_delivered_exactly(sim: SimulatedBroker, topology: Topology, d: int, queue: str) -> None:
    key = delay_routing_key(d, queue, topology.levels)
    arrivals = sim.deliver(topology.delay_entry, key)
    assert len(arrivals) == 1, (d, queue, arrivals)
    (arrival,) = arrivals
    assert arrival.queue == topology.names.queue(queue), (d, arrival)
    assert arrival.ttl_ms == d * 1000, (d, arrival)
    assert len(set(arrival.path)) == len(arrival.path), (d, arrival)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("1.#", "1.default", True),
        ("1.#", "1", True),
        ("1.#", "0.1.default", False),
        ("*.1.#", "0.1.default", True),
        ("*.1.#", "1.0.default", False),
        ("*.1.#", "1.default", False),
        ("*.*.0.#", "1.1.0.q", True),
        ("*.*.0.#", "1.0.q", False),
        ("#.default", "0.1.default", True),
        ("#.default", "default", True),
        ("#.default", "0.1.default.x", False),
        ("#.default", "0.1.nodefault", False),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.b", "a.bb", False),
        ("q-1", "q-1", True),
    ],
)
def test_simulated_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_simulator_catches_a_broken_plan() -> None:
    """The proof has teeth: a plan missing one binding, or with a wrong TTL, fails it."""
    good = plan("ns", QUEUES, max_delay=63)
    for d in range(64):
        assert_delivered_exactly(SimulatedBroker(good), good, d, "default")
    missing = replace(good, bindings=[b for b in good.bindings if b.routing_key != "*.*.*.0.#"])
    with pytest.raises(AssertionError):
        for d in range(64):
            assert_delivered_exactly(SimulatedBroker(missing), missing, d, "default")
    queues = [
        replace(q, arguments={**q.arguments, "x-message-ttl": 5000})
        if q.name == "ns.delay.02"
        else q
        for q in good.queues
    ]
    wrong_ttl = replace(good, queues=queues)
    sim = SimulatedBroker(wrong_ttl)
    with pytest.raises(AssertionError):
        for d in range(64):
            assert_delivered_exactly(sim, wrong_ttl, d, "default")


def test_every_delay_up_to_one_day_arrives_exactly_once_on_time() -> None:
    """The covering delays of a day's plan (every combination of its 12 lowest levels)."""
    topology = plan("ns", QUEUES, max_delay=DAY)
    assert topology.levels == 17
    sim = SimulatedBroker(topology)
    for d in covering_delays(topology.levels, DAY, 12):
        assert_delivered_exactly(sim, topology, d, QUEUES[d % len(QUEUES)])


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_delays_up_to_thirty_days_arrive_exactly_once_on_time(queue_type: Any) -> None:
    topology = plan("ns", QUEUES, queue_type=queue_type)
    assert topology.levels == 22
    sim = SimulatedBroker(topology)
    rng = random.Random(20240602)
    delays = set(range(4096))
    for bit in range(topology.levels):
        delays |= {2**bit - 1, 2**bit, 2**bit + 1}
    delays |= {rng.randrange(THIRTY_DAYS + 1) for _ in range(3000)}
    delays = {d for d in delays if d <= THIRTY_DAYS} | {THIRTY_DAYS}
    for d in sorted(delays):
        assert_delivered_exactly(sim, topology, d, QUEUES[d % len(QUEUES)])


def test_queue_names_that_look_like_bits_route_exactly() -> None:
    """A work queue may be called ``0`` or ``1``: only its position tells it from a bit."""
    queues = ["0", "1", "default"]
    topology = plan("ns", queues, max_delay=1023)
    sim = SimulatedBroker(topology)
    for d in range(1024):
        for queue in queues:
            assert_delivered_exactly(sim, topology, d, queue)


def test_undelayed_publishes_route_by_queue_name() -> None:
    topology = plan("ns", QUEUES)
    sim = SimulatedBroker(topology)
    for queue in QUEUES:
        assert sim.deliver(topology.names.direct, queue) == [Arrival(f"ns.{queue}", 0, ())]
    assert sim.deliver(topology.names.direct, "nosuch") == []
    assert sim.deliver(topology.names.dlx, "default") == [Arrival("ns.dlq", 0, ())]
