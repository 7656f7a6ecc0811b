"""The broker contract: the few operations every broker provides.

Everything else (encoding, routing decisions, retries, eta handling, leases kept alive
while tasks run) is shared code above this contract.

Semantics every implementation honours (checked by ``tests/contract/test_broker.py``):

* ``publish`` routes through the named exchange exactly as AMQP would; the nameless
  exchange ``""`` delivers straight to the queue named by the routing key. A message that
  reaches no queue is dropped, as AMQP drops unroutable messages (``mandatory=False``).
* ``delay`` makes a message invisible until that many seconds have passed; it waits in the
  broker, not in any worker's memory.
* ``fetch`` returns at most ``max_messages`` deliveries, blocking up to ``timeout`` seconds
  for the first one. Each delivery is leased for ``visibility_timeout`` seconds: unless it
  is acked, rejected or extended in time, it becomes visible again with
  ``redelivered=True`` and a higher ``delivery_count``.
* Higher ``priority`` (0-9) is served first where the broker supports priorities.
* ``reject(requeue=False)`` dead-letters the message with its reason where the broker
  can keep it; ``reject(requeue=True)`` makes it visible again at once.
* ``defer`` gives a leased message back to be delivered no earlier than ``until`` (an
  eta that arrived early); at-least-once: it is never lost between the two steps.
* ``wake`` interrupts a ``fetch`` blocked in another thread (used at shutdown).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor.envelope import Delivery, Envelope
from conveyor.routing import Binding, Exchange, Queue

if TYPE_CHECKING:
    from conveyor.brokers.idle_gate import IdleGate


@dataclass(frozen=True, slots=True)
class QueueStats:
    name: str
    ready: int
    delayed: int = 0
    leased: int = 0
    dead: int = 0


@dataclass(frozen=True, slots=True)
class RidingAcks:
    """Acks a worker has queued, sent with a fetch ahead instead of on their own.

    The broker that accepts them calls ``done`` once, when it knows their fate:
    ``done(True)`` when the broker applied them, ``done(False)`` when it cannot tell (a
    lost connection) or did not send them, and the worker then sends them the usual way.
    Acks are idempotent, so sending one twice is harmless."""

    deliveries: list[Delivery]
    done: Callable[[bool], None]


class Broker(ABC):
    """A connection to one broker, safe to use from several threads."""

    scheme: str = ""
    supports_priority: bool = True
    native_delay: bool = True
    lists_queues: bool = True
    """False where the protocol cannot enumerate queues (AMQP 0-9-1): ``stats()`` without
    names then covers only the queues this broker object declared or used."""
    shared_between_processes: bool = True
    """False where the queues live in this process only (``memory://``): processes that
    consume on their own, as the prefork pool's do, would each see empty queues."""
    ack_linger: float = 0.002
    """Seconds a worker's acks may wait to travel together. Where an ack is a request to
    the broker (a script, a transaction), gathering them saves round trips; an ack
    delayed a little changes nothing a user can see."""
    acks_wait: bool = True
    """Whether ``ack_many`` waits for the broker. Where it only queues the ack for an I/O
    thread (AMQP), the worker calls it directly instead of through a thread of its own."""
    fetches_ahead: bool = False
    """Whether :meth:`fetch_ahead` can send a fetch at all (Redis): the worker asks only
    then, rather than working out the room for a fetch before every task."""
    settles_any_delivery: bool = True
    """Whether any connection may ack or requeue a delivery from its tag, as with leases
    kept in the broker (SQLite, Redis). In AMQP only the receiving channel can; when it
    closes, the broker requeues what it held by itself."""

    def __init__(self, url: str, *, visibility_timeout: float = 3600.0) -> None:
        self.url = url
        self.visibility_timeout = visibility_timeout

    # -- topology ---------------------------------------------------------------------
    @abstractmethod
    def declare_exchange(self, exchange: Exchange) -> None: ...

    @abstractmethod
    def declare_queue(self, queue: Queue) -> None:
        """Create the queue if missing, with its exchange and bindings."""

    @abstractmethod
    def bind(self, binding: Binding) -> None: ...

    # -- producing --------------------------------------------------------------------
    @abstractmethod
    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None: ...

    def publish_many(
        self, items: Sequence[tuple[Envelope, str, str]], *, delay: float | None = None
    ) -> None:
        """Publish ``(envelope, exchange, routing_key)`` triples; brokers batch this."""
        for envelope, exchange, routing_key in items:
            self.publish(envelope, exchange=exchange, routing_key=routing_key, delay=delay)

    # -- consuming --------------------------------------------------------------------
    @abstractmethod
    def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]: ...

    def fetch_ahead(
        self, queues: Sequence[str], max_messages: int, note: Callable[[str], None],
        riders: RidingAcks | None = None,
    ) -> bool:
        """Send a fetch of up to ``max_messages`` and return without its reply, so the
        request travels while the caller runs a task; the next :meth:`fetch` (or
        :meth:`take_ahead`) reads it. ``note(fetch_id)`` is called before the request
        leaves: should the caller die before reading the reply, whoever settles for it
        gives the messages back with :meth:`release_unread`. ``riders`` go in the same
        write, and their ``done`` is called when the reply is read. False where the
        broker has no such thing (the default) or one is pending already; then nothing
        was sent and ``riders`` are still the caller's to send."""
        return False

    def take_ahead(self) -> list[Delivery]:
        """The deliveries of the fetch sent ahead, if one is pending (thread-safe)."""
        return []

    def release_unread(self, queues: Sequence[str], fetch_id: str) -> int:
        """Give back what the fetch ``fetch_id`` (sent ahead on ``queues``) took, when its
        reply was never read; returns how many messages went back."""
        return 0

    def set_prefetch(self, count: int) -> None:  # noqa: B027 - only push brokers need it
        """How many messages the consumer may hold unsettled (the worker's window:
        concurrency x ``worker_prefetch_multiplier``). Brokers that push messages to the
        consumer (AMQP ``basic.qos``) use it; without it they size prefetch from ``fetch``'s
        ``max_messages``."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None: ...

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self.ack(delivery)

    @abstractmethod
    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None: ...

    @abstractmethod
    def extend(self, deliveries: Sequence[Delivery], seconds: float | None = None) -> None:
        """Renew the leases of held deliveries by ``seconds`` (default: the lease length)."""

    def defer(self, delivery: Delivery, until: float) -> None:
        """Hand a leased message back, invisible until the UNIX time ``until``."""
        delay = max(0.0, until - time.time())
        self.publish(
            delivery.envelope,
            exchange="",
            routing_key=delivery.queue,
            delay=delay,
        )
        self.ack(delivery)

    # -- administration ---------------------------------------------------------------
    @abstractmethod
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of a queue; return how many."""

    @abstractmethod
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Depths of the named queues, or of every queue the broker knows."""

    def wake(self) -> None:  # noqa: B027 - optional for brokers whose fetch never blocks long
        """Interrupt a ``fetch`` blocked in another thread."""

    def share_idle_wait(self, gate: IdleGate) -> None:  # noqa: B027 - where idle waits are cheap
        """Take turns with the other processes of one worker at waiting for messages
        (see :mod:`conveyor.brokers.idle_gate`). Brokers that hand each message to one
        consumer by themselves (AMQP), or that wake idle fetches cheaply, ignore it."""

    def idle_wait_kept_until(self) -> float | None:
        """When (monotonic) this process must hand over the shared idle wait it kept
        after a fetch that left its queues empty, or None if it keeps none. It keeps it
        while it runs what it took, since it looks again right after; a job that runs
        longer calls :meth:`hand_over_idle_wait` then."""
        return None

    def hand_over_idle_wait(self) -> None:  # noqa: B027 - only where the wait is shared
        """Let a sibling process take over the idle wait this one kept. Must be safe in a
        signal handler of the fetching thread."""

    @abstractmethod
    def close(self) -> None: ...

    def check(self) -> None:  # noqa: B027 - embedded brokers are always reachable
        """Raise :class:`~conveyor.errors.BrokerUnavailable` if the broker can't be reached."""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
