"""RabbitMQ (AMQP 0-9-1) through py-amqp, the client Celery itself uses.

``amqp://user:pass@host:port/vhost`` (also ``pyamqp://``; ``amqps://`` for TLS, with
``broker_transport_options={"ssl": {...}}`` for certificates). One connection per broker
object and process, with three channels: *admin* (declarations, checks), *publish*
(confirm mode) and *consume* (``basic.consume`` + ``basic.qos``). See ``docs/amqp.md``.

How the contract maps onto RabbitMQ:

* exchanges, queues and bindings are RabbitMQ's own, declared exactly as kombu declares
  them, so Celery peers can declare them too without a 406;
* ``delay`` and ``defer`` use the TTL-queue chain of :mod:`amqp_delay`: nothing waits
  unacknowledged, so ``consumer_timeout`` never closes a channel because of an eta;
* a lease is RabbitMQ's unacknowledged delivery: it lasts until ack, reject, or the
  channel closes (``visibility_timeout`` does not apply; ``extend`` only watches for
  RabbitMQ's ``consumer_timeout``);
* ``reject(requeue=False)`` copies the message, with the reason, to ``conveyor.dead.<queue>``
  (publisher-confirmed, then acked), unless the queue has a dead-letter exchange of its own:
  then RabbitMQ dead-letters it natively;
* priorities work on queues declared with ``x-max-priority``, higher first.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Sequence
from typing import Any

from conveyor.brokers.amqp_consume import Arrival, Consuming, DeliveryCounter, Held
from conveyor.brokers.amqp_delay import DelayChain, DelayedCounts, QueueSpec, delay_ms
from conveyor.brokers.amqp_io import AmqpIo, parse_amqp_url
from conveyor.brokers.amqp_message import (
    REPLY_ADDRESSES,
    build_message,
    dead_letter_headers,
    dead_letter_of,
    envelope_of,
)
from conveyor.brokers.amqp_publish import Outgoing, Publisher
from conveyor.brokers.amqp_topology import Topology, dead_letter_queue
from conveyor.brokers.base import Broker, QueueStats
from conveyor.brokers.virtual import DeadLetter
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import ConfigurationError, RoutingError
from conveyor.request import current_request
from conveyor.routing import DEFAULT_EXCHANGE, Binding, Exchange, Queue

logger = logging.getLogger("conveyor.broker.amqp")

DEFAULT_FRAME_MAX = 131072

KNOWN_OPTIONS = frozenset(
    {
        "ssl",
        "heartbeat",
        "connect_timeout",
        "operation_timeout",
        "reconnect_max_delay",
        "client_properties",
        "confirm_window",
        "confirm_window_bytes",
        "default_queue_type",
        "delay_queue_type",
        "dead_letter_queues",
        "consumer_timeout",
        "close_timeout",
        "per_message_ttl",
    }
)

_OPEN: weakref.WeakSet[AmqpBroker] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # A script that sends tasks and exits must not lose the ones still being confirmed.
    for broker in list(_OPEN):
        broker.close()


class AmqpBroker(Broker):
    scheme = "amqp"
    supports_priority = False  # only on queues declared with x-max-priority
    native_delay = True
    lists_queues = False
    settles_any_delivery = False
    ack_linger = 0.0  # an ack is one frame, no round trip; held back it would stall basic.qos
    acks_wait = False  # ack_many hands the frames to the I/O thread and returns

    def __init__(self, url: str, *, visibility_timeout: float = 3600.0, **options: Any) -> None:
        super().__init__(url, visibility_timeout=visibility_timeout)
        unknown = set(options) - KNOWN_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"unknown AMQP transport options {sorted(unknown)}; known: "
                f"{', '.join(sorted(KNOWN_OPTIONS))}"
            )
        params = parse_amqp_url(url, options)
        self.dead_letter_queues = bool(options.get("dead_letter_queues", True))
        timeout = options.get("consumer_timeout")
        self.consumer_timeout = float(timeout) if timeout is not None else 1800.0
        self.close_timeout = float(options.get("close_timeout", 10.0))
        self.per_message_ttl = bool(options.get("per_message_ttl", False))
        self.chain = DelayChain(quorum=options.get("delay_queue_type") == "quorum")
        self._chain_prefixes = (DelayChain(False).prefix + ".", DelayChain(True).prefix + ".")
        self.io = AmqpIo(params, url=url, name=f"conveyor-amqp-{id(self):x}")
        self.topology = Topology(default_queue_type=options.get("default_queue_type"))
        self.publisher = Publisher(
            self.io,
            window=int(options.get("confirm_window", 1000)),
            window_bytes=int(options.get("confirm_window_bytes", 32 * 1024 * 1024)),
        )
        self.consuming = Consuming(
            self.io,
            self.topology,
            consumer_timeout_ms=None if timeout is None else int(float(timeout) * 1000),
        )
        self.io.attachments.extend([self.topology, self.publisher, self.consuming])
        self._counter = DeliveryCounter()
        self._landings: dict[tuple[str, str], str] = {}
        self._delayed = DelayedCounts()
        self._warned: set[str] = set()
        self._closed = False
        self._pid = os.getpid()
        self.io.start()
        _OPEN.add(self)

    # -- topology ---------------------------------------------------------------------------
    def declare_exchange(self, exchange: Exchange) -> None:
        self.io.call(lambda conn: self.topology.declare_exchange(exchange))

    def declare_queue(self, queue: Queue) -> None:
        self.io.call(lambda conn: self.topology.declare_queue(queue))

    def bind(self, binding: Binding) -> None:
        self.io.call(lambda conn: self.topology.bind(binding))

    # -- producing --------------------------------------------------------------------------
    def publish(
        self, envelope: Envelope, *, exchange: str, routing_key: str, delay: float | None = None
    ) -> None:
        self.publish_many([(envelope, exchange, routing_key)], delay=delay)

    def publish_many(
        self, items: Sequence[tuple[Envelope, str, str]], *, delay: float | None = None
    ) -> None:
        if not items:
            return
        self.io.wait_connected()
        frame_max = self.io.frame_max or DEFAULT_FRAME_MAX
        millis = delay_ms(delay) if delay is not None and delay > 0 else 0
        self._check_destinations(items, delayed=millis > 0)
        outgoing: list[Outgoing] = []
        for envelope, exchange, routing_key in items:
            message, size = build_message(
                envelope, frame_max=frame_max, per_message_ttl=self.per_message_ttl
            )
            if millis:
                landing = self._landings[(exchange, routing_key)]
                outgoing.append(
                    Outgoing(
                        message, self.chain.entry, self.chain.routing_key(landing, millis), size
                    )
                )
            else:
                outgoing.append(Outgoing(message, exchange, routing_key, size))
        if millis:
            self._note_delayed(items, millis)
        # A message sent by a running task must be in RabbitMQ before the task returns:
        # its own message may be acked then, by this process or the worker's parent.
        request = current_request()
        wait = request.id is not None and not request.called_directly
        self.publisher.send(outgoing, wait=wait)

    def _check_destinations(
        self, items: Sequence[tuple[Envelope, str, str]], *, delayed: bool
    ) -> None:
        """Unknown exchanges fail the whole batch before anything is sent."""
        topology = self.topology
        exchanges = {
            exchange
            for _, exchange, _ in items
            if exchange != DEFAULT_EXCHANGE and not topology.knows_exchange(exchange)
        }
        queues = {
            key
            for _, exchange, key in items
            if exchange == DEFAULT_EXCHANGE and not topology.knows_queue(key)
        }
        landings = {
            (exchange, key)
            for _, exchange, key in items
            if delayed and (exchange, key) not in self._landings
        }
        if not (exchanges or queues or landings):
            return

        def check(conn: Any) -> None:
            for name in sorted(exchanges):
                if not topology.exchange_exists(name):
                    raise RoutingError(f"exchange {name!r} does not exist")
            for name in sorted(queues):
                topology.ensure_queue(name)
            if landings:
                topology.ensure_chain(self.chain)
            for exchange, key in sorted(landings):
                landing, specs = self.chain.landing(exchange, key)
                for spec in specs:
                    topology.apply(spec)
                self._landings[(exchange, key)] = landing

        self.io.call(check)

    def _note_delayed(self, items: Sequence[tuple[Envelope, str, str]], millis: int) -> None:
        """Count delayed messages by destination queue, for ``stats`` in this process."""
        named = [
            (envelope, exchange, key)
            for envelope, exchange, key in items
            if exchange != DEFAULT_EXCHANGE
        ]
        routed: list[list[str]] = []
        if named:
            routed = self.io.call(
                lambda conn: [
                    self.topology.local_route(exchange, key, envelope.headers)
                    for envelope, exchange, key in named
                ]
            )
        destinations = [key for _, exchange, key in items if exchange == DEFAULT_EXCHANGE]
        destinations += [queue for queues in routed for queue in queues]
        self._delayed.add(destinations, millis / 1000)

    # -- consuming ---------------------------------------------------------------------------
    def fetch(self, queues: Sequence[str], max_messages: int, timeout: float) -> list[Delivery]:
        if isinstance(queues, str):
            raise TypeError("fetch() takes a sequence of queue names, not one string")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        names = list(dict.fromkeys(queues))
        if not names:
            raise ValueError("fetch() needs at least one queue name")
        self._read_own_writes()
        arrivals = self.consuming.fetch(names, max_messages, timeout)
        return [self._delivery(arrival) for arrival in arrivals]

    def _read_own_writes(self) -> None:
        # What this broker published is in RabbitMQ before it reads or counts anything.
        if self.publisher.unconfirmed:
            self.publisher.flush(self.io.params.operation_timeout)

    def _delivery(self, arrival: Arrival) -> Delivery:
        message = arrival.message
        info = message.delivery_info
        raw_headers = message.properties.get("application_headers") or {}
        if str(raw_headers.get("x-first-death-queue", "")).startswith(self._chain_prefixes):
            self._delayed.landed(arrival.queue)
        envelope = envelope_of(message, self._chain_prefixes)
        REPLY_ADDRESSES.remember(envelope)
        quorum_count = envelope.headers.pop("x-delivery-count", None)
        key = (
            envelope.headers.get("id")
            or envelope.properties.get("correlation_id")
            or envelope.properties.get("message_id")
        )
        redelivered = bool(info.get("redelivered"))
        count = self._counter.count(
            arrival.queue, key if isinstance(key, str) else None, redelivered, quorum_count
        )
        tag = f"{arrival.generation}.{info['delivery_tag']}"
        with self.consuming.cond:
            self.consuming.held[tag] = Held(arrival.queue, arrival.generation, time.monotonic())
        return Delivery(
            envelope=envelope,
            queue=arrival.queue,
            tag=tag,
            exchange=str(info.get("exchange") or ""),
            routing_key=str(info.get("routing_key") or ""),
            redelivered=redelivered,
            delivery_count=count,
            broker_data=(arrival.generation, int(info["delivery_tag"])),
        )

    def _release(self, delivery: Delivery) -> tuple[int, int] | None:
        """Forget a held delivery; its (generation, tag) if its channel is still open."""
        data = delivery.broker_data
        if not (isinstance(data, tuple) and len(data) == 2):
            return None
        generation, tag = data
        consuming = self.consuming
        with consuming.cond:
            consuming.held.pop(delivery.tag, None)
            current = generation == consuming.generation
        self._warned.discard(delivery.tag)
        if not current:
            logger.debug(
                "Ignoring a settle of delivery %s: its channel is closed and "
                "RabbitMQ delivers the message again",
                delivery.tag,
            )
            return None
        return generation, tag

    def set_prefetch(self, count: int) -> None:
        """``basic.qos`` of the consuming channel: the worker's window, exactly."""
        self.consuming.set_prefetch(count)

    def ack(self, delivery: Delivery) -> None:
        found = self._release(delivery)
        if found is not None:
            self.consuming.settle("ack", found[1], found[0])

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        found = [found for delivery in deliveries if (found := self._release(delivery))]
        self.consuming.settle_many("ack", found)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        found = self._release(delivery)
        if found is None:
            return
        generation, tag = found
        if requeue:
            self.consuming.settle("requeue", tag, generation)
            return
        native = "x-dead-letter-exchange" in self.topology.queue_arguments(delivery.queue)
        if native or not self.dead_letter_queues:
            logger.warning(
                "Rejected a message from %r without requeue (%s)%s",
                delivery.queue,
                reason or "no reason given",
                "; RabbitMQ dead-letters it" if native else "; it is dropped",
            )
            self.consuming.settle("reject", tag, generation)
            return
        dead = dead_letter_queue(delivery.queue)
        self.io.call(lambda conn: self.topology.apply(QueueSpec(dead)))
        message, size = build_message(
            delivery.envelope,
            frame_max=self.io.frame_max or DEFAULT_FRAME_MAX,
            extra_headers=dead_letter_headers(delivery, reason),
        )
        self.publisher.send(
            [
                Outgoing(
                    message,
                    DEFAULT_EXCHANGE,
                    dead,
                    size,
                    still_wanted=self._still_current(generation),
                )
            ],
            wait=True,
        )
        self.consuming.settle("ack", tag, generation)

    def _still_current(self, generation: int) -> Any:
        return lambda: generation == self.consuming.generation

    def extend(self, deliveries: Sequence[Delivery], seconds: float | None = None) -> None:
        # RabbitMQ keeps an unacked delivery for as long as its channel lives: nothing to
        # renew. But its consumer_timeout closes the channel of a delivery held too long.
        limit = self.consumer_timeout * 0.8
        now = time.monotonic()
        with self.consuming.cond:
            late = [
                (delivery, now - held.since)
                for delivery in deliveries
                if (held := self.consuming.held.get(delivery.tag)) is not None
                and now - held.since > limit
                and delivery.tag not in self._warned
            ]
            self._warned.update(delivery.tag for delivery, _ in late)
        for delivery, age in late:
            logger.warning(
                "A message from %r has been held unacknowledged for %.0fs; RabbitMQ's "
                "consumer_timeout (%.0fs by default) will close the channel and deliver "
                "it again (docs/amqp.md)",
                delivery.queue,
                age,
                self.consumer_timeout,
            )

    def defer(self, delivery: Delivery, until: float) -> None:
        found = self._release(delivery)
        if found is None:
            return
        generation, tag = found
        millis = delay_ms(until - time.time())
        key = (DEFAULT_EXCHANGE, delivery.queue)
        if key not in self._landings:
            self._check_destinations([(delivery.envelope, *key)], delayed=True)
        message, size = build_message(
            delivery.envelope,
            frame_max=self.io.frame_max or DEFAULT_FRAME_MAX,
            per_message_ttl=self.per_message_ttl,
        )
        if millis:
            exchange = self.chain.entry
            routing_key = self.chain.routing_key(self._landings[key], millis)
            self._delayed.add([delivery.queue], millis / 1000)
        else:
            exchange, routing_key = key
        # The original is acked only once RabbitMQ confirmed the copy: never lost between
        # the two steps. If the channel dies first, the original comes back instead and
        # the copy is not sent again.
        self.publisher.send(
            [
                Outgoing(
                    message,
                    exchange,
                    routing_key,
                    size,
                    on_confirmed=lambda: self.consuming.settle("ack", tag, generation),
                    still_wanted=self._still_current(generation),
                )
            ]
        )

    # -- administration ------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        self._read_own_writes()
        purged = self.io.call(lambda conn: self.topology.purge(queue))
        # Messages RabbitMQ already pushed to this process (not fetched) go too.
        consuming = self.consuming
        with consuming.cond:
            buffered = list(consuming.take_all(queue))
        for arrival in buffered:
            consuming.settle(
                "ack", int(arrival.message.delivery_info["delivery_tag"]), arrival.generation
            )
        return purged + len(buffered)

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        self._read_own_writes()
        topology = self.topology
        names = list(queues) if queues is not None else None

        def depths(conn: Any) -> list[tuple[str, int | None, int]]:
            listed = names if names is not None else list(topology.known_queue_names)
            found: list[tuple[str, int | None, int]] = []
            for name in listed:
                ready = topology.queue_depth(name)
                dead = topology.queue_depth(dead_letter_queue(name)) if ready is not None else 0
                found.append((name, ready, dead or 0))
            if self.consuming.channel is not None:
                self.consuming.barrier()
            return found

        found = self.io.call(depths)
        consuming = self.consuming
        result = []
        with consuming.cond:
            buffered = consuming.buffered_counts()
            leased: dict[str, int] = {}
            for held in consuming.held.values():
                if held.generation == consuming.generation:
                    leased[held.queue] = leased.get(held.queue, 0) + 1
        for name, ready, dead in found:
            if ready is None and queues is None:
                continue
            result.append(
                QueueStats(
                    name,
                    ready=(ready or 0) + buffered.get(name, 0),
                    delayed=self._delayed.count(name),
                    leased=leased.get(name, 0),
                    dead=dead,
                )
            )
        return result

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The messages rejected without requeue from ``queue`` (oldest first), left in place."""
        dead = dead_letter_queue(queue)

        def peek(conn: Any) -> list[Any]:
            if self.topology.queue_depth(dead) is None:
                return []
            channel = conn.channel()
            try:
                found: list[Any] = []
                while len(found) < limit and (message := channel.basic_get(dead)):
                    found.append(message)
                return found
            finally:
                channel.close()  # unacked gets go back to the queue, in order

        return [
            dead_letter_of(message, queue, self._chain_prefixes) for message in self.io.call(peek)
        ]

    def wake(self) -> None:
        self.consuming.wake()

    def check(self) -> None:
        self.io.wait_connected()
        self.io.call(lambda conn: None)

    def close(self) -> None:
        if self._closed or os.getpid() != self._pid:
            return  # closed already, or a forked child's copy: the parent's to close
        self._closed = True
        _OPEN.discard(self)
        if self.io.connected and not self.publisher.flush(self.close_timeout):
            logger.error(
                "Closing with %d published messages RabbitMQ never confirmed; they may be lost",
                self.publisher.unconfirmed,
            )
        self.consuming.wake()
        self.io.close()
