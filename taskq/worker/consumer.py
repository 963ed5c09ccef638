"""The worker's AMQP side: one consumer per work queue, a weighted buffer, batched acks.

Priority policy
---------------
Each work queue the worker consumes (``--queues``, highest priority first) has
its own channel whose prefetch (``--prefetch``) bounds how many unclaimed
envelopes of that queue the worker buffers. When concurrency slots free up,
:class:`Buffers` chooses which buffered envelopes get them by smooth weighted
round robin: the queue at rank ``r`` (0 = highest) of ``n`` has weight
``2**(n-1-r)``; with the default four queues that is 8:4:2:1, so while every
queue has a backlog ``critical`` gets 8 of every 15 slots and ``low`` still gets
1. A queue with nothing buffered is skipped, its share going to the others.
Within a queue envelopes are taken in delivery order.

Prefetch applies per queue, so a worker buffers at most ``prefetch * queues``
envelopes besides the ``concurrency`` tasks it runs. A buffered envelope is
unacked and unclaimed: if the worker stops or dies, RabbitMQ redelivers it.

A paused queue (see :mod:`taskq.worker.pauses`) has no consumer: :meth:`QueueConsumer.pause`
cancels it, and nothing consumes it again (not a reopened channel, not a broker's
cancel) until :meth:`QueueConsumer.resume`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from taskq.amqp.broker import Link
from taskq.amqp.envelope import Envelope
from taskq.amqp.topology import Names
from taskq.errors import BrokerError
from taskq.service import Service, raise_if_cancelled

log = logging.getLogger("taskq.worker")

OnMessage: TypeAlias = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]

# Errors of acks and rejects on a channel that closed meanwhile: the broker has
# requeued those deliveries already, so there is nothing left to settle.
_SETTLE_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


@dataclass(slots=True)
class Delivery:
    """An envelope received from work queue ``queue`` (its short name), not yet settled.

    ``redelivered``: RabbitMQ delivered it before and it was not settled (the
    worker that had it died or lost its channel), or an inline claim of it
    failed: its handler may have run already, so it is never run inline again
    (see :mod:`taskq.worker.inline`).
    """

    envelope: Envelope
    queue: str
    channel: aiormq.abc.AbstractChannel
    tag: int
    redelivered: bool = False

    @property
    def live(self) -> bool:
        """False once its channel closed: the broker has requeued it; it cannot be acked."""
        return not self.channel.is_closed


def weights(queues: Sequence[str]) -> dict[str, int]:
    """The scheduling weight of each queue, listed highest priority first."""
    return {queue: 1 << (len(queues) - 1 - rank) for rank, queue in enumerate(queues)}


class Buffers:
    """Buffered deliveries per queue; :meth:`take` hands them out by smooth weighted round robin."""

    def __init__(self, queues: Sequence[str]) -> None:
        self._weights = weights(queues)
        self._queues: dict[str, deque[Delivery]] = {queue: deque() for queue in queues}
        self._current = dict.fromkeys(queues, 0)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def queues(self) -> frozenset[str]:
        """The work queues buffered."""
        return frozenset(self._queues)

    def put(self, delivery: Delivery) -> None:
        self._queues[delivery.queue].append(delivery)
        self._size += 1

    def put_back(self, deliveries: Iterable[Delivery]) -> None:
        """Return deliveries to the front of their queues (a claim that could not run)."""
        for delivery in reversed(list(deliveries)):
            self._queues[delivery.queue].appendleft(delivery)
            self._size += 1

    def remove(self, queue: str) -> list[Delivery]:
        """Remove and return the deliveries buffered from ``queue``."""
        items = self._queues[queue]
        out = list(items)
        items.clear()
        self._size -= len(out)
        return out

    def take(self, count: int) -> list[Delivery]:
        """Up to ``count`` live deliveries, chosen by weight among the non-empty queues."""
        taken: list[Delivery] = []
        while len(taken) < count and self._size:
            queue = self._next_queue()
            delivery = self._queues[queue].popleft()
            self._size -= 1
            if delivery.live:
                taken.append(delivery)
        return taken

    def _next_queue(self) -> str:
        # Smooth weighted round robin (as nginx balances upstreams): every
        # non-empty queue earns its weight, the richest is served and pays the
        # total. Over any window the shares match the weights, evenly interleaved.
        total = 0
        best: str | None = None
        for queue, items in self._queues.items():
            if not items:
                continue
            weight = self._weights[queue]
            total += weight
            self._current[queue] += weight
            if best is None or self._current[queue] > self._current[best]:
                best = queue
        assert best is not None
        self._current[best] -= total
        return best

    def clear(self) -> list[Delivery]:
        """Remove and return everything buffered."""
        out = [delivery for items in self._queues.values() for delivery in items]
        for items in self._queues.values():
            items.clear()
        self._size = 0
        return out


class Acker:
    """Settles deliveries, acking a run of consecutive delivery tags with one ``multiple`` ack.

    Delivery tags count up per channel. Any tag of a channel that is not yet
    settled blocks a ``multiple`` ack beyond it, since that would settle a
    delivery nobody has claimed; the rest are acked one by one. Settling is
    serialised: a ``multiple`` ack must never overtake a single ack of a tag it
    covers, or the broker closes the channel for an unknown delivery tag.
    """

    def __init__(self) -> None:
        self._pending: dict[aiormq.abc.AbstractChannel, dict[int, None]] = {}
        self._lock = asyncio.Lock()

    def received(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        self._pending.setdefault(channel, {})[tag] = None

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        by_channel: dict[aiormq.abc.AbstractChannel, set[int]] = {}
        for delivery in deliveries:
            by_channel.setdefault(delivery.channel, set()).add(delivery.tag)
        async with self._lock:
            for channel, tags in by_channel.items():
                pending = self._pending.get(channel, {})
                run_end, run_length = 0, 0
                for tag in pending:
                    if tag not in tags:
                        break
                    run_end, run_length = tag, run_length + 1
                for tag in tags:
                    pending.pop(tag, None)
                try:
                    if run_length > 1:
                        await channel.basic_ack(run_end, multiple=True, wait=False)
                        tags = {tag for tag in tags if tag > run_end}
                    for tag in sorted(tags):
                        await channel.basic_ack(tag, wait=False)
                except _SETTLE_ERRORS as exc:
                    log.debug("ack on a closed channel (the broker requeued): %s", exc)
            self._forget_closed()

    async def reject(self, channel: aiormq.abc.AbstractChannel, tag: int, *, requeue: bool) -> None:
        """Reject one delivery; without requeue the queue dead-letters it to the DLQ."""
        async with self._lock:
            self._pending.get(channel, {}).pop(tag, None)
            try:
                await channel.basic_reject(tag, requeue=requeue, wait=False)
            except _SETTLE_ERRORS as exc:
                log.debug("reject on a closed channel (the broker requeued): %s", exc)

    async def give_back(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        """Return one delivery to its queue unprocessed (a paused queue's): ``basic.nack``
        with requeue, which RabbitMQ 4.3+ does not count towards a quorum queue's
        delivery limit (``basic.reject`` does; before 4.3 every return counts)."""
        async with self._lock:
            self._pending.get(channel, {}).pop(tag, None)
            try:
                await channel.basic_nack(tag, requeue=True, wait=False)
            except _SETTLE_ERRORS as exc:
                log.debug("nack on a closed channel (the broker requeued): %s", exc)

    def _forget_closed(self) -> None:
        for channel in [c for c in self._pending if c.is_closed]:
            del self._pending[channel]


class QueueConsumer:
    """Consumes one work queue on its own robust channel, and keeps consuming.

    Envelopes are taken from aiormq directly: aio-pika's message objects cost
    more per delivery than the rest of the worker's path, and the worker needs
    only the body, the channel and the delivery tag. aio-pika's robust channel
    still reopens the channel (after a reconnection or a channel error) and
    restores its prefetch; this class consumes again then, and also when the
    broker cancels the consumer (the queue was deleted, a quorum queue lost its
    leader), once a passive declare on a probe channel shows the queue is back.

    Args:
        name: the work queue's full name.
        queue: its short name.
        on_message: the aiormq consumer callback.
    """

    RETRY_SECONDS = 1.0

    def __init__(
        self,
        name: str,
        queue: str,
        on_message: OnMessage,
    ) -> None:
        self.name = name
        self.queue = queue
        self.tag = f"taskq-{queue}-{uuid.uuid4().hex[:8]}"
        self._on_message = on_message
        self._channel: AbstractRobustChannel | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._paused = False
        self._cancelling: asyncio.Task[None] | None = None

    async def start(self, connection: AbstractRobustConnection, prefetch: int) -> None:
        channel = await connection.channel(publisher_confirms=False)
        assert isinstance(channel, AbstractRobustChannel)
        self._channel = channel
        await channel.set_qos(prefetch_count=prefetch)
        channel.reopen_callbacks.add(self._on_reopen)
        raw = await channel.get_underlay_channel()
        if not await self._exists(raw):
            raise BrokerError(f"work queue {self.name!r} does not exist: run taskq rmq-init")
        if self._paused:
            log.info("not consuming %s: the queue is paused", self.name)
        else:
            await self._consume(raw)

    async def _exists(self, raw: aiormq.abc.AbstractChannel) -> bool:
        # A failed passive declare closes its channel: probe on a throwaway one.
        probe = await raw.connection.channel(publisher_confirms=False)
        try:
            await probe.queue_declare(self.name, passive=True, timeout=5)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not probe.is_closed:
                await probe.close()
        return True

    async def _consume(self, raw: aiormq.abc.AbstractChannel) -> None:
        if self.tag in cast(aiormq.Channel, raw).consumers:
            return
        raw.on_consumer_cancel_callbacks.add(self._on_cancel)
        await raw.basic_consume(self.name, self._on_message, consumer_tag=self.tag)
        log.info("consuming %s", self.name)

    def _on_reopen(self, channel: Any) -> None:
        self._keep_consuming()

    def _on_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self.tag:
            log.warning("the broker cancelled the consumer of %s", self.name)
            self._keep_consuming()

    def _keep_consuming(self) -> None:
        if self._consuming and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._resume(), name=f"taskq-consume-{self.queue}")

    @property
    def _consuming(self) -> bool:
        return not self._stopped and not self._paused

    async def _resume(self) -> None:
        while self._consuming and self._channel is not None:
            raise_if_cancelled()  # even one a cancelled channel open swallowed
            try:
                raw = await self._channel.get_underlay_channel()
                if await self._exists(raw):
                    await self._consume(raw)
                    return
                log.warning("work queue %s does not exist; trying again", self.name)
            except (TimeoutError, *_SETTLE_ERRORS) as exc:
                # The channel is being reopened; its reopen callback or the next try consumes.
                log.debug("consuming %s again failed: %s", self.name, exc)
            await asyncio.sleep(self.RETRY_SECONDS)

    async def pause(self) -> None:
        """Cancel the consumer, and consume again only after :meth:`resume`.
        Deliveries received before are the caller's to settle."""
        if not self._paused:
            self._paused = True
            await self._cancel()

    def resume(self) -> None:
        """Consume again (unless stopped), in the background."""
        if self._paused:
            self._paused = False
            self._keep_consuming()

    def cancel_stray(self) -> None:
        """A delivery came while paused: make sure the consumer is cancelled (a consume
        that was in flight as the pause cancelled its task may have gone through)."""
        if self._paused and (self._cancelling is None or self._cancelling.done()):
            self._cancelling = asyncio.create_task(
                self._cancel(), name=f"taskq-cancel-{self.queue}"
            )

    async def stop(self) -> None:
        """Stop receiving; unsettled deliveries stay unacked until :meth:`close`."""
        self._stopped = True
        await self._cancel()

    async def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is None:
            return
        try:
            raw = await self._channel.get_underlay_channel()
            if self.tag in cast(aiormq.Channel, raw).consumers:
                await raw.basic_cancel(self.tag, timeout=5)
        except (TimeoutError, *_SETTLE_ERRORS) as exc:
            log.debug("cancelling the consumer of %s: %s", self.name, exc)

    async def close(self) -> None:
        """Close the channel: RabbitMQ requeues whatever is still unacked."""
        self._stopped = True
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except (TimeoutError, *_SETTLE_ERRORS) as exc:
                log.debug("closing the channel of %s: %s", self.name, exc)


class Consumers(Service):
    """One :class:`QueueConsumer` per work queue on a robust connection.

    Args:
        names: the namespace's names.
        queues: short names of the work queues, highest priority first.
        prefetch: unacked envelopes per queue.
        on_delivery: called with each parsed envelope.
        on_invalid: called with the queue and the error of each undecodable message,
            after it was rejected to the DLQ.
        acker: told of every delivery, and rejects the invalid ones.
        link: the broker link to consume on (a robust connection, see
            :func:`taskq.amqp.broker.connect`); it must be ready when :meth:`start` runs.

    :meth:`stop_receiving` cancels the consumers and keeps the channels open, so
    that the deliveries claimed meanwhile can still be acked; :meth:`stop` closes
    the channels, and RabbitMQ requeues whatever is still unacked.
    """

    name = "taskq-consumers"

    def __init__(
        self,
        names: Names,
        queues: Sequence[str],
        prefetch: int,
        *,
        on_delivery: Callable[[Delivery], None],
        on_invalid: Callable[[str, Exception], None],
        acker: Acker,
        link: Link,
    ) -> None:
        self._link = link
        self._prefetch = prefetch
        self._on_delivery = on_delivery
        self._on_invalid = on_invalid
        self._acker = acker
        self._consumers = [
            QueueConsumer(names.queue(queue), queue, self._callback(queue)) for queue in queues
        ]
        self._by_queue = {consumer.queue: consumer for consumer in self._consumers}
        self._paused: set[str] = set()

    async def _start(self) -> None:
        """Consume every queue.

        Raises:
            BrokerError: if a work queue does not exist (the topology is not declared)
                or the link is not connected.
        """
        connection = self._link.connection()
        assert isinstance(connection, AbstractRobustConnection)
        for consumer in self._consumers:
            await consumer.start(connection, self._prefetch)

    def _callback(self, queue: str) -> OnMessage:
        async def on_message(message: DeliveredMessage) -> None:
            channel = message.channel
            deliver = message.delivery
            tag = deliver.delivery_tag  # type: ignore[union-attr]
            assert tag is not None
            redelivered = bool(deliver.redelivered)  # type: ignore[union-attr]
            self._acker.received(channel, tag)
            if self._paused and queue in self._paused:
                # Sent before the broker took the cancel in: back to the queue, unclaimed.
                await self._acker.give_back(channel, tag)
                self._by_queue[queue].cancel_stray()
                return
            try:
                envelope = Envelope.parse(message.body)
            except Exception as exc:
                # InvalidEnvelope, or any error a hostile body provokes: an
                # unsettled delivery would hold a prefetch slot for good. The
                # work queue's dead-letter exchange sends it to the DLQ, where
                # x-death names the queue and the reason "rejected".
                await self._acker.reject(channel, tag, requeue=False)
                self._on_invalid(queue, exc)
                return
            self._on_delivery(Delivery(envelope, queue, channel, tag, redelivered))

        return on_message

    async def pause(self, queue: str) -> None:
        """Stop consuming work queue ``queue`` (its short name) until :meth:`resume`
        (before :meth:`start`: it is not consumed at the start). From the call on, its
        deliveries still arriving go back to the broker unclaimed; those received
        before are the caller's (see :meth:`taskq.worker.claims.Claimer.pause`)."""
        self._paused.add(queue)
        await self._by_queue[queue].pause()

    def resume(self, queue: str) -> None:
        """Consume work queue ``queue`` again."""
        self._paused.discard(queue)
        self._by_queue[queue].resume()

    async def stop_receiving(self) -> None:
        """Stop receiving; unsettled deliveries stay unacked until :meth:`stop`."""
        for consumer in self._consumers:
            await consumer.stop()

    async def _stop(self, timeout: float) -> None:
        """Close the channels: RabbitMQ requeues whatever is still unacked."""
        for consumer in self._consumers:
            await consumer.close()
