"""An in-process broker that honours the whole broker contract, for tests.

Brokers created with the same URL in one process share one store (``memory://`` and
``memory://other`` are two stores), so a producer app and a worker running in threads of
the same process see the same queues. Headers and properties are kept as JSON, as the
SQLite and Redis brokers keep them, so what this broker accepts and hands back (a fresh
copy for every delivery) is what they would.

Each queue keeps two heaps: *ready* messages by (priority, time they became visible, id)
and *waiting* ones (delayed or leased) by the time they become visible. A message moves
between heaps by pushing a new entry and bumping its ``version``; entries whose version is
stale are skipped when they surface, so no move costs more than ``O(log n)``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor.brokers.base import Broker, QueueStats
from conveyor.brokers.virtual import (
    DeadLetter,
    Doorbell,
    Topology,
    TopologyChange,
    WakeRequests,
    encode_json,
    new_lease_token,
    priority_of,
    unique_queue_names,
)
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import ConfigurationError
from conveyor.routing import Binding, Exchange, Queue


@dataclass(frozen=True, slots=True)
class _Stored:
    """An envelope as the broker keeps it: headers and properties as JSON text.

    Like a networked broker, this refuses what it could not carry (EncodeError) and
    hands every consumer its own copy, with JSON's types (tuples come back as lists).
    """

    body: bytes
    content_type: str
    content_encoding: str
    headers: str
    properties: str

    @classmethod
    def of(cls, envelope: Envelope) -> _Stored:
        return cls(
            envelope.body,
            envelope.content_type,
            envelope.content_encoding,
            encode_json(envelope.headers, "message headers"),
            encode_json(envelope.properties, "message properties"),
        )

    def envelope(self) -> Envelope:
        return Envelope(
            self.body,
            self.content_type,
            self.content_encoding,
            json.loads(self.headers),
            json.loads(self.properties),
        )


@dataclass(eq=False, slots=True)
class _Message:
    id: int
    queue: str
    stored: _Stored
    exchange: str
    routing_key: str
    priority: int
    visible_at: float
    delivery_count: int = 0
    lease_token: str | None = None
    version: int = 0
    gone: bool = False


# (-priority, visible_at, id, version, message): ids are unique, so the message itself is
# never compared.
_ReadyEntry = tuple[int, float, int, int, _Message]
_WaitingEntry = tuple[float, int, int, _Message]


@dataclass(slots=True)
class _MemoryQueue:
    ready: list[_ReadyEntry] = field(default_factory=list)
    waiting: list[_WaitingEntry] = field(default_factory=list)
    dead: list[tuple[_Message, str, float]] = field(default_factory=list)


def _current(entry_version: int, message: _Message) -> bool:
    return not message.gone and entry_version == message.version


class _Store:
    """The queues behind one URL; every method expects ``doorbell.condition`` to be held."""

    def __init__(self) -> None:
        self.doorbell = Doorbell()
        self.topology = Topology()
        self.queues: dict[str, _MemoryQueue] = {}
        # Held until the message is re-leased or removed, even once the lease lapsed:
        # a late ack still counts if nobody else has taken the message meanwhile.
        self.leases: dict[str, _Message] = {}
        self._ids = itertools.count(1)

    def clear(self) -> None:
        self.topology = Topology()
        self.queues.clear()
        self.leases.clear()

    def queue(self, name: str) -> _MemoryQueue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _MemoryQueue()
        return queue

    # -- moving messages ------------------------------------------------------------------
    def add(
        self,
        name: str,
        stored: _Stored,
        *,
        priority: int,
        exchange: str,
        routing_key: str,
        visible_at: float,
        now: float,
    ) -> None:
        message = _Message(
            next(self._ids),
            name,
            stored,
            exchange,
            routing_key,
            priority,
            visible_at,
        )
        self.make_visible_at(message, visible_at, now)

    def make_visible_at(self, message: _Message, visible_at: float, now: float) -> None:
        message.visible_at = visible_at
        message.version += 1
        queue = self.queue(message.queue)
        if visible_at <= now:
            entry = (-message.priority, visible_at, message.id, message.version, message)
            heapq.heappush(queue.ready, entry)
        else:
            heapq.heappush(queue.waiting, (visible_at, message.id, message.version, message))

    def remove(self, message: _Message) -> None:
        message.gone = True
        message.version += 1
        self.release_lease(message)

    def release_lease(self, message: _Message) -> None:
        if message.lease_token is not None:
            self.leases.pop(message.lease_token, None)
            message.lease_token = None

    def leased(self, token: str) -> _Message | None:
        return self.leases.get(token)

    # -- reading queues -------------------------------------------------------------------
    def promote_due(self, queue: _MemoryQueue, now: float) -> None:
        while queue.waiting and queue.waiting[0][0] <= now:
            _, _, version, message = heapq.heappop(queue.waiting)
            if _current(version, message):
                self.make_visible_at(message, message.visible_at, now)

    def ready_head(self, queue: _MemoryQueue) -> _ReadyEntry | None:
        while queue.ready:
            head = queue.ready[0]
            if _current(head[3], head[4]):
                return head
            heapq.heappop(queue.ready)
        return None

    def existing(self, names: Sequence[str]) -> list[_MemoryQueue]:
        # Reading a queue that was never declared must not create it.
        return [queue for name in names if (queue := self.queues.get(name)) is not None]

    def next_due(self, names: Sequence[str]) -> float | None:
        due: list[float] = []
        for queue in self.existing(names):
            waiting = queue.waiting
            while waiting and not _current(waiting[0][2], waiting[0][3]):
                heapq.heappop(waiting)
            if waiting:
                due.append(waiting[0][0])
        return min(due, default=None)

    def take(
        self, names: Sequence[str], max_messages: int, lease_for: float, now: float
    ) -> list[_Message]:
        queues = self.existing(names)
        for queue in queues:
            self.promote_due(queue, now)
        taken: list[_Message] = []
        while len(taken) < max_messages:
            heads = [(head, queue) for queue in queues if (head := self.ready_head(queue))]
            if not heads:
                break
            head, queue = min(heads, key=lambda pair: pair[0][:3])
            heapq.heappop(queue.ready)
            message = head[4]
            self.release_lease(message)
            message.lease_token = new_lease_token()
            message.delivery_count += 1
            self.leases[message.lease_token] = message
            self.make_visible_at(message, now + lease_for, now)
            taken.append(message)
        return taken

    def purge(self, name: str, now: float) -> int:
        queue = self.queues.get(name)
        if queue is None:
            return 0
        self.promote_due(queue, now)
        purged = 0
        for _, _, _, version, message in queue.ready:
            if _current(version, message):
                self.remove(message)
                purged += 1
        queue.ready.clear()
        kept: list[_WaitingEntry] = []
        for entry in queue.waiting:
            message = entry[3]
            if not _current(entry[2], message):
                continue
            if message.lease_token is None:
                self.remove(message)
                purged += 1
            else:
                kept.append(entry)
        heapq.heapify(kept)
        queue.waiting = kept
        return purged

    def stats(self, name: str, now: float) -> QueueStats:
        queue = self.queues.get(name)
        if queue is None:
            return QueueStats(name, 0)
        self.promote_due(queue, now)
        ready = sum(1 for entry in queue.ready if _current(entry[3], entry[4]))
        waiting = [entry[3] for entry in queue.waiting if _current(entry[2], entry[3])]
        leased = sum(1 for message in waiting if message.lease_token is not None)
        return QueueStats(name, ready, len(waiting) - leased, leased, len(queue.dead))


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _store_for(url: str) -> _Store:
    key = url.rstrip("/")  # memory:// and memory:/// name the same store
    with _STORES_LOCK:
        return _STORES.setdefault(key, _Store())


class MemoryBroker(Broker):
    """Queues in this process's memory; a blocked ``fetch`` wakes the moment it can."""

    scheme = "memory"
    shared_between_processes = False
    ack_linger = 0.0

    def __init__(self, url: str = "memory://", *, visibility_timeout: float = 3600.0) -> None:
        if not url.startswith("memory://"):
            raise ConfigurationError(f"not a memory broker URL: {url!r} (use memory://[name])")
        super().__init__(url, visibility_timeout=visibility_timeout)
        self._store = _store_for(url)
        self._lock = self._store.doorbell.condition
        self._wake_requests = WakeRequests(self._store.doorbell)

    @classmethod
    def reset_all(cls) -> None:
        """Empty every store in this process (for tests).

        Stores are emptied rather than dropped, so brokers that already exist keep sharing
        one store with the ones created afterwards.
        """
        with _STORES_LOCK:
            stores = list(_STORES.values())
        for store in stores:
            with store.doorbell.condition:
                store.clear()

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        """The messages rejected without requeue from ``queue``, oldest first."""
        with self._lock:
            found = self._store.queues.get(queue)
            dead = [] if found is None else found.dead
            return [
                DeadLetter(m.stored.envelope(), m.queue, m.exchange, m.routing_key,
                           m.delivery_count, reason, dead_at)
                for m, reason, dead_at in dead
            ]  # fmt: skip

    # -- topology -------------------------------------------------------------------------
    def _apply(self, change: TopologyChange, *queues: str) -> None:
        self._store.topology.apply(change)
        for name in queues:
            self._store.queue(name)

    def declare_exchange(self, exchange: Exchange) -> None:
        with self._lock:
            self._apply(self._store.topology.plan_exchange(exchange))

    def declare_queue(self, queue: Queue) -> None:
        with self._lock:
            self._apply(self._store.topology.plan_queue(queue), queue.name)

    def bind(self, binding: Binding) -> None:
        with self._lock:
            self._apply(self._store.topology.plan_binding(binding), binding.queue)

    # -- producing ------------------------------------------------------------------------
    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        self.publish_many([(envelope, exchange, routing_key)], delay=delay)

    def publish_many(
        self, items: Sequence[tuple[Envelope, str, str]], *, delay: float | None = None
    ) -> None:
        stored = [_Stored.of(envelope) for envelope, _, _ in items]
        with self._lock:
            topology = self._store.topology
            # Route everything first: an unknown exchange fails the batch before any of it
            # is queued.
            routed = [
                (topology.destinations(exchange, key, envelope.headers), envelope, exchange, key)
                for envelope, exchange, key in items
            ]
            now = time.time()
            visible_at = now + delay if delay and delay > 0 else now
            for kept, (queues, envelope, exchange, key) in zip(stored, routed, strict=True):
                for name in queues:
                    self._store.add(
                        name,
                        kept,
                        priority=priority_of(envelope),
                        exchange=exchange,
                        routing_key=key,
                        visible_at=visible_at,
                        now=now,
                    )
            if any(queues for queues, *_ in routed):
                self._store.doorbell.ring()

    # -- consuming ------------------------------------------------------------------------
    def fetch(self, queues: Sequence[str], max_messages: int, timeout: float) -> list[Delivery]:
        names = unique_queue_names(queues, max_messages)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            wake_mark = self._wake_requests.mark()
            while True:
                now = time.time()
                taken = self._store.take(names, max_messages, self.visibility_timeout, now)
                if taken:
                    return [self._delivery(message) for message in taken]
                remaining = deadline - time.monotonic()
                # Only a fetch that would block uses up a wake; a poll leaves it pending.
                if remaining <= 0 or self._wake_requests.consume(wake_mark):
                    return []
                due = self._store.next_due(names)
                if due is not None:
                    remaining = min(remaining, max(0.0, due - now))
                self._lock.wait(remaining)

    def _delivery(self, message: _Message) -> Delivery:
        assert message.lease_token is not None
        return Delivery(
            envelope=message.stored.envelope(),
            queue=message.queue,
            tag=message.lease_token,
            exchange=message.exchange,
            routing_key=message.routing_key,
            redelivered=message.delivery_count > 1,
            delivery_count=message.delivery_count,
        )

    def ack(self, delivery: Delivery) -> None:
        self.ack_many([delivery])

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                message = self._store.leased(delivery.tag)
                if message is not None:
                    self._store.remove(message)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        with self._lock:
            message = self._store.leased(delivery.tag)
            if message is None:
                return
            now = time.time()
            if requeue:
                self._store.release_lease(message)
                self._store.make_visible_at(message, now, now)
                self._store.doorbell.ring()
            else:
                self._store.remove(message)
                self._store.queue(message.queue).dead.append((message, reason, now))

    def extend(self, deliveries: Sequence[Delivery], seconds: float | None = None) -> None:
        lease_for = self.visibility_timeout if seconds is None else seconds
        with self._lock:
            now = time.time()
            for delivery in deliveries:
                message = self._store.leased(delivery.tag)
                if message is not None:
                    self._store.make_visible_at(message, now + lease_for, now)

    def defer(self, delivery: Delivery, until: float) -> None:
        with self._lock:
            message = self._store.leased(delivery.tag)
            if message is None:
                return
            self._store.release_lease(message)
            # Handing back an early eta is not a failed delivery: the next one counts as
            # the same attempt, so redelivery limits are not used up by waiting.
            message.delivery_count -= 1
            self._store.make_visible_at(message, until, time.time())
            self._store.doorbell.ring()

    # -- administration -------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        with self._lock:
            return self._store.purge(queue, time.time())

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self._lock:
            names = sorted(self._store.queues) if queues is None else list(queues)
            now = time.time()
            return [self._store.stats(name, now) for name in names]

    def wake(self) -> None:
        self._wake_requests.request()

    def close(self) -> None:
        # The store outlives this object: other brokers on the same URL still use it.
        self.wake()
