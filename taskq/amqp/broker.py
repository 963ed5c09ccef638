"""Everything that talks AMQP: connecting, declaring the topology, publishing envelopes.

aio-pika and aiormq exceptions stay inside this module; callers see
:class:`~taskq.errors.BrokerError` and its subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractRobustConnection,
)
from pamqp.common import FieldTable
from yarl import URL

from taskq.amqp import frames
from taskq.amqp.envelope import Envelope
from taskq.amqp.topology import Topology, delay_routing_key
from taskq.errors import (
    BrokerError,
    DelayTooLong,
    Nacked,
    PublishError,
    TaskqError,
    TopologyConflict,
    Unpublishable,
)
from taskq.service import Service

log = logging.getLogger("taskq.broker")

PUBLISH_TIMEOUT = 10.0
RECONNECT_SECONDS = 1.0

# What RabbitMQ says (in a 406 channel close) when a declaration differs from
# what exists, e.g. "inequivalent arg 'x-queue-type' for queue 'taskq.default'
# in vhost '/': received the value 'quorum' of type 'longstr' but current is none".
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r".*?received (?:the value )?'?(?P<wanted>[^' ]+)'?(?: of type '[^']+')?"
    r" but current is (?:the value )?'?(?P<existing>[^' ]+)'?"
)

_BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError)


class _ClosedOnFailure(aio_pika.Connection):
    """A connection that closes itself when its first connect fails (or is cancelled).

    aio-pika leaves such a connection open, and closing it is then left to its
    ``__del__``, which can only drop a ``close()`` coroutine unawaited: every
    failed attempt (a broker down for a while) left one behind.
    """

    async def connect(self, timeout: aio_pika.abc.TimeoutType = None) -> None:
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise


class _RobustClosedOnFailure(_ClosedOnFailure, aio_pika.RobustConnection):
    """:class:`_ClosedOnFailure`, for a connection that reconnects once it was up
    (its ``connect`` wraps :class:`aio_pika.RobustConnection`'s, next in the MRO).

    Given the URLs of a cluster's nodes (:attr:`nodes`), each reconnection goes to
    the next node: the one it lost (a node killed, stopped or cut off) may stay away
    long, and any node of the cluster serves every queue.
    """

    nodes: tuple[URL, ...] = ()
    _first_attempt = True

    def _next_node(self) -> None:
        if len(self.nodes) > 1:
            at = self.nodes.index(self.url) if self.url in self.nodes else -1
            self.url = self.nodes[(at + 1) % len(self.nodes)]

    # aio-pika's reconnection loop calls this private method for every attempt,
    # the first connect included (tests/unit/test_broker_failover.py checks it
    # still exists): the one place to choose the node an attempt goes to.
    async def _RobustConnection__connect_transport(self) -> None:
        if self._first_attempt:
            self._first_attempt = False
        else:
            self._next_node()
        await _ROBUST_CONNECT_TRANSPORT(self)


_ROBUST_CONNECT_TRANSPORT = aio_pika.RobustConnection._RobustConnection__connect_transport  # type: ignore[attr-defined]


def _urls(urls: str | Sequence[str]) -> list[str]:
    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed:
        raise BrokerError("no broker URL given")
    return listed


def failover_order(urls: Sequence[str], start: int | None = None) -> list[str]:
    """``urls`` in the order a new connection tries them: from ``start`` (a random one
    if None, so that a fleet's connections spread over a cluster's nodes), then on."""
    if start is None:
        start = random.randrange(len(urls)) if urls else 0
    return [*urls[start:], *urls[:start]]


async def connect(
    urls: str | Sequence[str],
    *,
    name: str,
    robust: bool = True,
    heartbeat: float | None = None,
) -> AbstractConnection:
    """Open a connection named ``name`` (shown in the management UI); robust ones reconnect.

    ``urls`` is the broker's URL, or one per node of a cluster: they are tried in
    turn from a random one until one answers, and a robust connection that loses
    its node reconnects to the next, round and round.

    ``heartbeat`` (seconds, rounded up; 0 turns heartbeats off) replaces the URL's
    ``heartbeat``: RabbitMQ closes a connection that sends nothing for about that
    long, and requeues the envelopes it held unacked, so that a frozen process
    (stopped, paused, its event loop blocked) does not keep them.

    Raises:
        BrokerError: if no URL can be reached (the last failure's message).
    """
    order = failover_order(_urls(urls))
    failure: BaseException | None = None
    for url in order:
        try:
            return await _connect_one(url, order, name=name, robust=robust, heartbeat=heartbeat)
        except _BROKER_ERRORS as exc:
            failure = exc
            if len(order) > 1:
                log.debug("%s: a broker node did not answer: %s", name, exc)
    nodes = f" ({len(order)} nodes tried)" if len(order) > 1 else ""
    raise BrokerError(f"cannot connect to the broker{nodes}: {failure}") from failure


async def _connect_one(
    url: str, order: list[str], *, name: str, robust: bool, heartbeat: float | None
) -> AbstractConnection:
    properties: FieldTable = {"connection_name": name}
    beat = None if heartbeat is None else math.ceil(heartbeat)  # None: the URL's, or 60 s
    if not robust:
        return await aio_pika.connect(
            url, client_properties=properties, heartbeat=beat, connection_class=_ClosedOnFailure
        )
    options: dict[str, Any] = {"reconnect_interval": RECONNECT_SECONDS, "heartbeat": beat}
    connection = _RobustClosedOnFailure(
        aio_pika.connection.make_url(url, **options), client_properties=properties, **options
    )
    # Every node's URL carries the same options (aio-pika reads some from the URL).
    nodes = [aio_pika.connection.make_url(u, **options) for u in order]
    connection.nodes = tuple(nodes[order.index(url) :] + nodes[: order.index(url)])
    await connection.connect()
    return connection


@dataclass
class DeclareReport:
    """What :func:`declare` found and did."""

    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bindings: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.created)


def _conflict(kind: str, name: str, exc: BaseException) -> TopologyConflict:
    text = str(exc)
    match = _INEQUIVALENT.search(text)
    if match is None:
        return TopologyConflict(kind, name, f"other properties ({text})", "the planned ones")
    arg = match["arg"]
    existing = match["existing"]
    if existing == "none":
        existing = "none (a classic queue)" if arg == "x-queue-type" else "none"
    return TopologyConflict(kind, name, f"{arg}={existing}", f"{arg}={match['wanted']}")


async def _exists(connection: AbstractConnection, kind: str, name: str) -> bool:
    channel = await connection.channel()
    try:
        if kind == "queue":
            await channel.declare_queue(name, passive=True)
        else:
            await channel.declare_exchange(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def declare(connection: AbstractConnection, topology: Topology) -> DeclareReport:
    """Declare ``topology`` idempotently.

    Every object that already exists is first checked against the plan; if any
    differs, nothing at all is declared.

    Raises:
        TopologyConflict: for the first existing object that differs from the plan.
        BrokerError: if the broker fails otherwise.
    """
    report = DeclareReport()
    objects: list[tuple[str, Any]] = [("exchange", e) for e in topology.exchanges]
    objects += [("queue", q) for q in topology.queues]
    try:
        missing = []
        for kind, obj in objects:
            if not await _exists(connection, kind, obj.name):
                missing.append((kind, obj))
                continue
            conflict = await _try_declare(connection, kind, obj)
            if conflict is not None:
                if kind == "queue":
                    # RabbitMQ names only the first differing argument; a
                    # different queue type is the one that matters most.
                    wanted_type = {"x-queue-type": obj.arguments["x-queue-type"]}
                    probe = await _try_declare(
                        connection, kind, replace(obj, arguments=wanted_type)
                    )
                    if probe is not None and probe.existing.startswith("x-queue-type="):
                        conflict = probe
                raise conflict
            report.existing.append(f"{kind} {obj.name}")
        channel = await connection.channel()
        try:
            for kind, obj in missing:
                await _declare_one(channel, kind, obj)
                report.created.append(f"{kind} {obj.name}")
            for binding in topology.bindings:
                source = await channel.get_exchange(binding.source, ensure=False)
                if binding.destination_type == "queue":
                    queue = await channel.get_queue(binding.destination, ensure=False)
                    await queue.bind(source, binding.routing_key)
                else:
                    target = await channel.get_exchange(binding.destination, ensure=False)
                    await target.bind(source, binding.routing_key)
                report.bindings += 1
        finally:
            await channel.close()
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        raise BrokerError(f"the broker refused a declaration: {exc}") from exc
    except _BROKER_ERRORS as exc:
        raise BrokerError(f"declaring the topology failed: {exc}") from exc
    return report


async def _try_declare(
    connection: AbstractConnection, kind: str, obj: Any
) -> TopologyConflict | None:
    """Declare an existing object as planned; the conflict if it differs, else None."""
    channel = await connection.channel()
    try:
        await _declare_one(channel, kind, obj)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        return _conflict(kind, obj.name, exc)
    finally:
        if not channel.is_closed:
            await channel.close()
    return None


async def _declare_one(channel: AbstractChannel, kind: str, obj: Any) -> None:
    if kind == "exchange":
        await channel.declare_exchange(obj.name, obj.type, durable=True)
    else:
        await channel.declare_queue(obj.name, durable=True, arguments=obj.arguments)


class Link(Service):
    """A robust connection that keeps trying in the background until the broker answers.

    Processes that must keep working while the broker is down (the API accepts
    tasks into Postgres; the relay publishes them later) hold a link rather than
    a connection: :attr:`available` says whether publishing can work now.
    ``urls`` and ``heartbeat`` are those of :func:`connect`: with several URLs
    (a cluster's nodes) each attempt tries them all in turn before it waits.
    """

    RETRY_SECONDS = 1.0

    def __init__(
        self, urls: str | Sequence[str], *, name: str, heartbeat: float | None = None
    ) -> None:
        self.urls = _urls(urls)
        self.name = name
        self.heartbeat = heartbeat
        self._connection: AbstractConnection | None = None
        self._closing = False
        self.ready = asyncio.Event()

    async def _start(self) -> None:
        """Begin connecting in the background; returns at once."""
        self._spawn(self._connect_forever(), f"{self.name}-connect")

    async def _connect_forever(self) -> None:
        while self._connection is None:
            try:
                self._connection = await connect(
                    self.urls, name=self.name, robust=True, heartbeat=self.heartbeat
                )
            except BrokerError as exc:
                log.warning("broker unavailable, retrying: %s", exc)
                await asyncio.sleep(self.RETRY_SECONDS)
        # aio-pika reconnects by itself; say so in taskq's own words.
        self._connection.close_callbacks.add(self._on_lost)
        if isinstance(self._connection, AbstractRobustConnection):
            self._connection.reconnect_callbacks.add(self._on_reconnected)
        self.ready.set()

    def _on_lost(self, sender: Any, exc: BaseException | None = None) -> None:
        if not self._closing:
            log.warning(
                "%s: lost the broker connection, reconnecting every %gs%s: %s",
                self.name,
                RECONNECT_SECONDS,
                f" (to each of {len(self.urls)} nodes in turn)" if len(self.urls) > 1 else "",
                exc or "closed",
            )

    def _on_reconnected(self, sender: Any) -> None:
        node = ""
        if len(self.urls) > 1 and isinstance(sender, aio_pika.Connection):
            node = f" at {sender.url.host}:{sender.url.port}"
        log.info("%s: reconnected to the broker%s", self.name, node)

    @property
    def available(self) -> bool:
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    def connection(self) -> AbstractConnection:
        """The connection, if it is up now.

        Raises:
            BrokerError: while the broker is unreachable.
        """
        connection = self._connection
        if connection is None or not connection.connected.is_set():
            raise BrokerError("the broker is unreachable")
        return connection

    async def _stop(self, timeout: float) -> None:
        self._closing = True
        await self._cancel_tasks()
        if self._connection is not None:
            await self._connection.close()


@dataclass(frozen=True, slots=True)
class Publish:
    """One envelope to publish: for work queue ``queue`` after ``delay`` seconds, or
    with ``dead_letter`` into the dead-letter queue (``headers`` say why)."""

    envelope: Envelope
    queue: str
    delay: float = 0.0
    headers: dict[str, Any] | None = None
    dead_letter: bool = False


class Publisher:
    """A channel with publisher confirms that publishes envelopes into one topology.

    :meth:`publish_many` writes a batch in one write and awaits its confirms
    together (:mod:`taskq.amqp.frames`); concurrent calls pipeline. A publish the
    broker returns as unroutable counts as failed, like a nack or a timeout.
    """

    def __init__(
        self, connection: AbstractConnection | Link, topology: Topology, max_delay: float
    ) -> None:
        self._source = connection
        self._work_queues = frozenset(
            b.routing_key for b in topology.bindings if b.source == topology.names.direct
        )
        self._topology = topology
        self._max_delay = max_delay
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _underlay(self) -> aiormq.abc.AbstractChannel:
        """The aiormq channel under the (robust) confirm-mode channel, opened if need be."""
        if self._channel is None or self._channel.is_closed:
            async with self._lock:
                if self._channel is None or self._channel.is_closed:
                    source = self._source
                    connection = source.connection() if isinstance(source, Link) else source
                    self._channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
        return await self._channel.get_underlay_channel()

    async def publish(
        self,
        envelope: Envelope,
        queue: str,
        *,
        delay: float = 0.0,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish ``envelope`` for work queue ``queue``, ``delay`` seconds from now.

        A positive delay is rounded up to whole seconds (never early) and becomes
        one publish into the delay levels.

        Raises:
            DelayTooLong: if ``delay`` exceeds the configured maximum.
            PublishError: if the broker does not confirm the publish.
        """
        (error,) = await self.publish_many([Publish(envelope, queue, delay, headers)])
        if error is not None:
            raise error

    async def publish_dead_letter(
        self, envelope: Envelope, queue: str, headers: dict[str, Any]
    ) -> None:
        """Publish ``envelope`` into the dead-letter queue with reason ``headers``.

        Raises:
            PublishError: if the broker does not confirm the publish.
        """
        (error,) = await self.publish_many([Publish(envelope, queue, 0.0, headers, True)])
        if error is not None:
            raise error

    async def publish_many(self, items: Sequence[Publish]) -> list[TaskqError | None]:
        """Publish ``items`` in one write with all their confirms in flight at once.

        Returns one entry per item: ``None`` if confirmed, else why not
        (:class:`DelayTooLong` or :class:`PublishError`).
        """
        results: list[TaskqError | None] = [None] * len(items)
        routed: list[tuple[int, frames.Outgoing]] = []
        for n, item in enumerate(items):
            try:
                routed.append((n, self._route(item)))
            except TaskqError as exc:
                results[n] = exc
            except Exception as exc:  # a value no message can carry: this item's fault alone
                results[n] = Unpublishable(f"no envelope can carry this task: {exc!r}")
        if not routed:
            return results
        try:
            if isinstance(self._source, Link) and not self._source.available:
                raise PublishError("the broker is unreachable")
            channel = await self._underlay()
        except (*_BROKER_ERRORS, BrokerError, aio_pika.exceptions.AMQPException) as exc:
            error = (
                exc if isinstance(exc, PublishError) else PublishError(f"publish failed: {exc!r}")
            )
            for n, _ in routed:
                results[n] = error
            return results
        errors = await frames.publish_batch(channel, [m for _, m in routed], PUBLISH_TIMEOUT)
        for (n, message), failure in zip(routed, errors, strict=True):
            if failure is not None:
                results[n] = _publish_error(message.exchange, failure)
        return results

    def _route(self, item: Publish) -> frames.Outgoing:
        """Where ``item`` goes and its message.

        Raises:
            Unpublishable: for a work queue the topology does not have.
            DelayTooLong: for a delay beyond the longest the delay levels allow.
        """
        envelope, queue = item.envelope, item.queue
        if item.dead_letter:
            properties = envelope.persistent(queue, headers=item.headers)
            return frames.Outgoing(self._topology.names.dlx, queue, envelope.body(), properties)
        if queue not in self._work_queues:
            # A delayed envelope for an unknown queue would be confirmed by the
            # first delay level and dropped when its delay ends: refuse it here.
            raise Unpublishable(f"no work queue {queue!r} in the topology")
        if item.delay > self._max_delay:
            raise DelayTooLong(
                f"a delay of {item.delay:g}s exceeds the maximum {self._max_delay:g}s"
            )
        seconds = math.ceil(item.delay) if item.delay > 0 else 0
        due_ms = int(time.time() * 1000) + seconds * 1000
        properties = envelope.persistent(queue, due_ms=due_ms, delay=seconds, headers=item.headers)
        if seconds:
            exchange = self._topology.delay_entry
            routing_key = delay_routing_key(seconds, queue, self._topology.levels)
        else:
            exchange, routing_key = self._topology.names.direct, queue
        return frames.Outgoing(exchange, routing_key, envelope.body(), properties)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


def _publish_error(exchange: str, exc: BaseException) -> PublishError:
    """taskq's error for a publish the broker did not confirm."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        return Unpublishable(f"the broker returned the envelope as unroutable: {exc}")
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return Nacked(f"the broker did not confirm the publish: {exc.frame!r}")
    return PublishError(f"publish to {exchange!r} failed: {exc!r}")


async def missing(connection: AbstractConnection, topology: Topology) -> list[str]:
    """The names of the topology's exchanges and queues that do not exist on the broker."""
    absent = []
    for exchange in topology.exchanges:
        if not await _exists(connection, "exchange", exchange.name):
            absent.append(exchange.name)
    for queue in topology.queues:
        if not await _exists(connection, "queue", queue.name):
            absent.append(queue.name)
    return absent


class DepthReader:
    """Reads queue depths with passive declares on a channel of its own.

    Each read is one ``queue.declare(passive=True)`` per queue on the raw
    channel (aio-pika's channel answers repeated passive declares from a cache).
    A queue that does not exist is left out of the answer.
    """

    def __init__(self, link: Link) -> None:
        self._link = link
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def depths(self, queues: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``{queue: (messages, consumers)}``.

        Raises:
            BrokerError: if the broker is unreachable or fails.
        """
        async with self._lock:
            out: dict[str, tuple[int, int]] = {}
            for name in queues:
                try:
                    raw = await self._raw_channel()
                    declared = await raw.queue_declare(name, passive=True, timeout=5)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    await self._close_channel()
                    continue
                except (*_BROKER_ERRORS, RuntimeError) as exc:
                    await self._close_channel()
                    raise BrokerError(f"cannot read the depth of {name}: {exc!r}") from exc
                out[name] = (declared.message_count or 0, declared.consumer_count or 0)
            return out

    async def purge(self, queue: str) -> int:
        """Purge ``queue``; returns how many messages it dropped.

        Raises:
            BrokerError: if the broker is unreachable or fails.
        """
        async with self._lock:
            try:
                raw = await self._raw_channel()
                purged = await raw.queue_purge(queue, timeout=10)
            except (*_BROKER_ERRORS, RuntimeError) as exc:
                await self._close_channel()
                raise BrokerError(f"cannot purge {queue}: {exc!r}") from exc
            return int(purged.message_count or 0)

    async def _raw_channel(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._link.connection().channel(publisher_confirms=False)
        return await self._channel.get_underlay_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except (*_BROKER_ERRORS, RuntimeError) as exc:
                log.debug("closing a depth channel failed: %s", exc)

    async def close(self) -> None:
        async with self._lock:
            await self._close_channel()
