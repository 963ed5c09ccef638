"""The RabbitMQ topology taskq needs: every name, queue argument and binding.

This module is pure: it computes names and the plan. ``broker`` declares the plan
and publishes into it. Names come only from :class:`Names`, never from literals
elsewhere, so the management UI shows what this module says.

Delays follow the multi-level delay infrastructure of NServiceBus's RabbitMQ
transport. Level ``L`` (0 ≤ L < levels) is a topic exchange and a queue, both
``<ns>.delay.LL``; the queue holds every message for exactly ``2**L`` seconds
(``x-message-ttl``) and then dead-letters it, routing key unchanged, to the next
lower level's exchange (level 0 dead-letters to ``<ns>.delay.deliver``). A
delayed envelope's routing key spells its delay in binary, most significant bit
first, one word per level, followed by its destination work queue::

    13 s to "default" with 5 levels  ->  "0.1.1.0.1.default"

The envelope is published to the highest level's exchange. Each level's exchange
sends it into that level's queue if its bit is 1, or straight on to the next
lower level if it is 0; ``<ns>.delay.deliver`` finally routes ``#.<queue>`` to
the work queue. The envelope therefore waits exactly the sum of the levels whose
bit is set, and every delay queue holds messages of one TTL only, so a short
delay never waits behind a long one (no head-of-line blocking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from taskq.errors import DelayTooLong

# Words that name taskq's own objects and so cannot name a work queue.
RESERVED_QUEUE_NAMES = frozenset({"direct", "dlx", "dlq", "delay"})


class Names:
    """Every exchange and queue name of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.direct = f"{namespace}.direct"
        self.dlx = f"{namespace}.dlx"
        self.dlq = f"{namespace}.dlq"
        self.delay_deliver = f"{namespace}.delay.deliver"

    def queue(self, queue: str) -> str:
        """The work queue that carries envelopes routed with key ``queue``."""
        return f"{self.namespace}.{queue}"

    def delay(self, level: int) -> str:
        """The exchange and the queue of delay level ``level`` (TTL ``2**level`` s)."""
        return f"{self.namespace}.delay.{level:02d}"


def delay_levels(max_delay: float) -> int:
    """How many levels are needed to spell every whole delay up to ``max_delay`` seconds."""
    return max(1, math.ceil(max_delay).bit_length())


def delay_routing_key(seconds: int, queue: str, levels: int) -> str:
    """The routing key that delays an envelope by ``seconds`` and then delivers it to ``queue``.

    Raises:
        DelayTooLong: if ``seconds`` needs more than ``levels`` bits.
    """
    if seconds < 0:
        raise ValueError(f"negative delay: {seconds}")
    if seconds >= 1 << levels:
        raise DelayTooLong(f"a delay of {seconds}s needs more than {levels} delay levels")
    return ".".join(format(seconds, f"0{levels}b")) + "." + queue


@dataclass(frozen=True)
class Exchange:
    name: str
    type: Literal["direct", "topic", "fanout"]


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    purpose: str = ""


@dataclass(frozen=True)
class Binding:
    source: str
    destination: str
    destination_type: Literal["queue", "exchange"]
    routing_key: str


@dataclass(frozen=True)
class Topology:
    """Everything ``taskq-rmq-init`` declares, in declaration order."""

    names: Names
    levels: int
    exchanges: list[Exchange]
    queues: list[Queue]
    bindings: list[Binding]

    @property
    def delay_entry(self) -> str:
        """The exchange a delayed envelope is published to: the highest level."""
        return self.names.delay(self.levels - 1)


def plan(
    namespace: str,
    queues: list[str],
    *,
    queue_type: Literal["quorum", "classic"] = "quorum",
    delivery_limit: int = 20,
    max_delay: float = 30 * 86400,
) -> Topology:
    """Compute the whole topology of one namespace."""
    for queue in queues:
        if queue in RESERVED_QUEUE_NAMES:
            raise ValueError(f"queue name {queue!r} is reserved")
    names = Names(namespace)
    levels = delay_levels(max_delay)

    def queue_arguments(dead_letter_exchange: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": queue_type}
        if dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = dead_letter_exchange
            if queue_type == "quorum":
                # Without both of these a quorum queue dead-letters at most once.
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
        return args

    exchanges = [
        Exchange(names.direct, "direct"),
        Exchange(names.dlx, "fanout"),
        Exchange(names.delay_deliver, "topic"),
        *(Exchange(names.delay(level), "topic") for level in range(levels)),
    ]
    work = []
    for queue in queues:
        args = queue_arguments(names.dlx)
        if queue_type == "quorum":
            args["x-delivery-limit"] = delivery_limit
        work.append(Queue(names.queue(queue), args, f"work queue '{queue}'"))
    delay = []
    for level in range(levels):
        onward = names.delay(level - 1) if level else names.delay_deliver
        args = queue_arguments(onward)
        args["x-message-ttl"] = (1 << level) * 1000
        delay.append(Queue(names.delay(level), args, f"delay level {level}: {1 << level}s"))
    dlq = Queue(names.dlq, queue_arguments(None), "dead letters")

    bindings = [Binding(names.direct, names.queue(q), "queue", q) for q in queues]
    bindings.append(Binding(names.dlx, names.dlq, "queue", ""))
    for level in range(levels):
        prefix = "*." * (levels - 1 - level)
        onward = names.delay(level - 1) if level else names.delay_deliver
        bindings.append(Binding(names.delay(level), names.delay(level), "queue", prefix + "1.#"))
        bindings.append(Binding(names.delay(level), onward, "exchange", prefix + "0.#"))
    bindings.extend(Binding(names.delay_deliver, names.queue(q), "queue", f"#.{q}") for q in queues)
    return Topology(names, levels, exchanges, [*work, dlq, *delay], bindings)
