"""Consuming: one channel with ``basic.consume`` per queue, feeding a buffer ``fetch`` drains.

RabbitMQ pushes up to ``prefetch`` unacknowledged messages to the consuming channel
(``basic.qos``; per channel, as Celery sets it, or per consumer when a quorum queue is
consumed: quorum queues refuse channel-wide QoS). The prefetch grows to the largest
``max_messages`` a ``fetch`` asked for: the worker asks for the room in its prefetch
window, so RabbitMQ's prefetch becomes concurrency x ``worker_prefetch_multiplier``.

Every delivery carries the *generation* of the channel it came on. A lost connection, or
a channel RabbitMQ closed (``consumer_timeout``), starts a new generation: RabbitMQ puts
the old deliveries back in their queues, and acks for them are dropped here (they would
fail on a new channel), with a debug log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.brokers.amqp_io import AmqpIo
from conveyor.brokers.amqp_topology import Topology
from conveyor.errors import BrokerUnavailable

logger = logging.getLogger("conveyor.broker.amqp")

MAX_PREFETCH = 65535
SETTLE_WAIT = 0.25
"""How long ``fetch(timeout=0)`` waits for messages RabbitMQ reports ready and is pushing."""
MISSING_RECHECK = 0.25
"""How often a blocked ``fetch`` looks again for a queue that did not exist yet."""


@dataclass(frozen=True, slots=True)
class Held:
    """A delivery handed to a caller and not settled yet (a lease, in the contract's words)."""

    queue: str
    generation: int
    since: float


@dataclass(eq=False, slots=True)
class Arrival:
    seq: int
    generation: int
    queue: str
    message: Any

    @property
    def priority(self) -> int:
        value = self.message.properties.get("priority")
        return int(value) if isinstance(value, int) else 0


class DeliveryCounter:
    """How often this process saw a message delivered, for queues that don't count.

    Classic queues only say ``redelivered``; quorum queues add ``x-delivery-count``. A
    message requeued and delivered here again is counted exactly; one first delivered
    elsewhere counts at least 2. Bounded: the oldest entries are forgotten.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def count(self, queue: str, key: str | None, redelivered: bool, quorum_count: Any) -> int:
        floor = int(quorum_count) + 1 if isinstance(quorum_count, int) else 1
        if not redelivered:
            if key is not None:
                with self._lock:
                    self._counts.pop((queue, key), None)
            return floor
        if key is None:
            return max(2, floor)
        with self._lock:
            value = max(2, floor, self._counts.get((queue, key), 1) + 1)
            self._counts[(queue, key)] = value
            self._counts.move_to_end((queue, key))
            while len(self._counts) > self._size:
                self._counts.popitem(last=False)
        return value


class Consuming:
    """The consuming channel of a connection and the buffer of what it received."""

    def __init__(
        self, io: AmqpIo, topology: Topology, *, consumer_timeout_ms: int | None = None
    ) -> None:
        self.io = io
        self.topology = topology
        self.consumer_arguments: dict[str, Any] = {}
        if consumer_timeout_ms is not None:
            # Per consumer (RabbitMQ >= 3.11.15): no change to the queue, whose argument
            # would make Celery's own declaration of it fail.
            self.consumer_arguments["x-consumer-timeout"] = consumer_timeout_ms
        self._warned_timeout = False
        self.cond = threading.Condition()
        # Shared with callers (under ``cond``).
        self.generation = 0
        self._buffers: dict[str, deque[Arrival]] = {}
        self.held: dict[str, Held] = {}  # by Delivery.tag
        self._wakes = 0
        # I/O thread only (callers read ``consuming`` and ``prefetch`` without a lock).
        self.channel: Any = None
        self.consuming: set[str] = set()
        self.prefetch = 0
        self.fixed_prefetch: int | None = None
        """Set by the worker (``set_prefetch``): then the prefetch no longer adapts."""
        self._wanted: dict[str, None] = {}
        self._tags: dict[str, str] = {}
        self._arrivals: list[Arrival] = []
        self._settles: deque[tuple[int, int, str]] = deque()
        self._seq = 0

    # -- Attachment (I/O thread) -------------------------------------------------------------
    def attach(self, connection: Any) -> None:
        if not self._wanted:
            return  # nothing consumed yet: the channel opens on the first fetch
        self._setup(connection.channel(), self.prefetch)
        logger.warning("Consuming from %s again", ", ".join(sorted(self.consuming)) or "-")

    def detach(self) -> None:
        self.channel = None
        self._new_generation()

    def channel_closed(self, channel: Any, code: int, text: str) -> None:
        if channel is not self.channel:
            return
        with self.cond:
            held = len(self.held)
        if "acknowledgement" in text and "timed out" in text:
            logger.error(
                "RabbitMQ's consumer_timeout closed the consuming channel (%s): a message "
                "stayed unacknowledged too long. The %d messages this process held go "
                "back to their queues and will be delivered again; long acks_late tasks "
                "need a larger consumer_timeout on the server (docs/amqp.md)",
                text,
                held,
            )
        else:
            logger.warning(
                "RabbitMQ closed the consuming channel (%s %s); %d held messages "
                "go back to their queues; consuming again",
                code,
                text,
                held,
            )
        self._new_generation()
        self._setup(channel, self.prefetch)

    def work(self) -> bool:
        channel = self.channel
        fixed = self.fixed_prefetch
        if channel is not None and fixed is not None and fixed != self.prefetch:
            self._apply_prefetch(fixed)
        settles = self._settles
        while settles:
            generation, tag, action = settles.popleft()
            if channel is None or generation != self.generation:
                logger.debug(
                    "Not settling delivery %s of a closed channel (%s): RabbitMQ delivers it again",
                    tag,
                    action,
                )
                continue
            if action == "ack":
                channel.basic_ack(tag)
            else:
                channel.basic_reject(tag, requeue=action == "requeue")
        return False

    def after_io(self) -> None:
        if not self._arrivals:
            return
        arrivals, self._arrivals = self._arrivals, []
        with self.cond:
            for arrival in arrivals:
                if arrival.generation == self.generation:
                    self._buffers.setdefault(arrival.queue, deque()).append(arrival)
            self.cond.notify_all()

    # -- the channel (I/O thread) ---------------------------------------------------------------
    def _new_generation(self) -> None:
        self.consuming = set()
        self._tags.clear()
        self._arrivals.clear()
        with self.cond:
            self.generation += 1
            self._buffers.clear()
            self.held.clear()
            self.cond.notify_all()

    def _setup(self, channel: Any, prefetch: int) -> None:
        if self.consumer_arguments and not self._warned_timeout:
            self._warned_timeout = True
            if not _per_consumer_timeouts(channel.connection):
                logger.warning(
                    "RabbitMQ %s ignores the consumer_timeout option (a per-consumer "
                    "timeout needs 3.11.15 or later): set consumer_timeout in "
                    "rabbitmq.conf instead",
                    channel.connection.server_properties.get("version", "?"),
                )
        self.channel = channel
        self.prefetch = 0
        self._apply_prefetch(max(1, prefetch))
        for name in list(self._wanted):
            if self.topology.queue_depth(name) is not None:
                self._consume(name)

    def _channel_wide(self) -> bool:
        return all(self.topology.queue_type(name) != "quorum" for name in self._wanted)

    def _apply_prefetch(self, prefetch: int) -> None:
        prefetch = min(MAX_PREFETCH, prefetch)
        self.channel.basic_qos(0, prefetch, self._channel_wide())
        self.prefetch = prefetch

    def _consume(self, name: str) -> None:
        tag = self.channel.basic_consume(
            name,
            no_ack=False,
            callback=self._on_message,
            on_cancel=self._on_cancel,
            arguments=self.consumer_arguments or None,
        )
        self._tags[tag] = name
        self.consuming.add(name)

    def _on_message(self, message: Any) -> None:
        queue = self._tags.get(message.delivery_info["consumer_tag"], "")
        self._seq += 1
        self._arrivals.append(Arrival(self._seq, self.generation, queue, message))

    def _on_cancel(self, tag: str) -> None:
        name = self._tags.pop(tag, None)
        if name is not None:
            self.consuming.discard(name)
            logger.warning("RabbitMQ cancelled the consumer of queue %r (was it deleted?)", name)

    def ensure_io(self, connection: Any, names: Sequence[str], prefetch: int) -> list[str]:
        """Consume from every named queue that exists; return the names that don't."""
        for name in names:
            self._wanted[name] = None
        if self.channel is None:
            self._setup(connection.channel(), prefetch)
        elif prefetch > self.prefetch or (
            self.fixed_prefetch is not None and prefetch != self.prefetch
        ):
            self._apply_prefetch(prefetch)
        missing: list[str] = []
        for name in names:
            if name in self.consuming:
                continue
            if self.topology.queue_depth(name) is None:
                missing.append(name)
            else:
                self._consume(name)
        return missing

    def settle_io(self, names: Sequence[str]) -> int:
        """Messages ready in these queues; everything RabbitMQ sent before is buffered."""
        ready = sum(self.topology.queue_depth(name) or 0 for name in names)
        self.barrier()
        return ready

    def barrier(self) -> None:
        """Buffer every delivery RabbitMQ sent before now (I/O thread).

        A synchronous method on the consuming channel is answered after the deliveries
        RabbitMQ had already sent on that channel.
        """
        self.channel.basic_qos(0, self.prefetch, self._channel_wide())
        self.after_io()

    # -- callers ------------------------------------------------------------------------------
    def set_prefetch(self, count: int) -> None:
        self.fixed_prefetch = max(1, min(MAX_PREFETCH, count))
        self.io.wake()  # applied by ``work`` if the channel is open, else when it opens

    def ensure(self, names: Sequence[str], prefetch: int) -> list[str]:
        prefetch = min(MAX_PREFETCH, prefetch)
        consuming = self.consuming
        if self.fixed_prefetch is not None:
            prefetch = self.fixed_prefetch
        if (
            self.channel is not None
            and prefetch <= self.prefetch
            and all(name in consuming for name in names)
        ):
            return []
        return self.io.call(lambda conn: self.ensure_io(conn, names, prefetch))

    def settle(self, kind: str, delivery_tag: int, generation: int) -> None:
        self._settles.append((generation, delivery_tag, kind))
        self.io.send_queued()

    def settle_many(self, kind: str, found: Sequence[tuple[int, int]]) -> None:
        """Settle (generation, delivery tag) pairs with one wake-up of the I/O thread."""
        self._settles.extend((generation, tag, kind) for generation, tag in found)
        if found:
            self.io.send_queued()

    def wake(self) -> None:
        with self.cond:
            self._wakes += 1
            self.cond.notify_all()

    def fetch(self, names: Sequence[str], max_messages: int, timeout: float) -> list[Arrival]:
        """Up to ``max_messages`` arrivals, waiting up to ``timeout`` for the first."""
        if not self.io.connected:
            # Not connected yet: wait a little. Connection lost: say so now, so the
            # worker logs it and backs off while the I/O thread reconnects.
            self.io.wait_connected(0 if self.io.connections else None)
        with self.cond:
            prefetch = self._window(names, max_messages)
        missing = self.ensure(names, prefetch)
        if timeout <= 0:
            return self._fetch_now(names, max_messages)
        deadline = time.monotonic() + timeout
        recheck = time.monotonic() + MISSING_RECHECK
        while True:
            with self.cond:
                while True:
                    taken = self._take(names, max_messages)
                    if taken:
                        return taken
                    if self._wakes:
                        self._wakes = 0
                        return []
                    if not self.io.connected:
                        raise BrokerUnavailable("lost the connection to RabbitMQ")
                    now = time.monotonic()
                    if now >= deadline:
                        return []
                    wider = self._window(names, max_messages)
                    if wider > prefetch or (missing and now >= recheck):
                        prefetch = wider
                        break
                    until = min(deadline, recheck) if missing else deadline
                    self.cond.wait(until - now)
            missing = self.ensure(names, prefetch)
            recheck = time.monotonic() + MISSING_RECHECK

    def _window(self, names: Sequence[str], max_messages: int) -> int:
        """The prefetch for a fetch (caller holds ``cond``).

        ``max_messages`` more than what is held already: the worker asks for the room
        left in its window, so this is its window. Messages RabbitMQ pushed for queues
        this fetch does not read don't use up its window.
        """
        if self.fixed_prefetch is not None:
            return self.fixed_prefetch
        elsewhere = sum(len(buffer) for name, buffer in self._buffers.items() if name not in names)
        return len(self.held) + elsewhere + max_messages

    def _fetch_now(self, names: Sequence[str], max_messages: int) -> list[Arrival]:
        with self.cond:
            taken = self._take(names, max_messages)
        if len(taken) >= max_messages:
            return taken
        ready = self.io.call(lambda conn: self.settle_io(names))
        deadline = time.monotonic() + SETTLE_WAIT
        with self.cond:
            taken += self._take(names, max_messages - len(taken))
            while not taken and ready and self._has_credit() and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
                taken += self._take(names, max_messages - len(taken))
        return taken

    def take_all(self, queue: str) -> list[Arrival]:
        """Caller holds ``cond``: remove what was pushed for ``queue`` and not fetched."""
        buffer = self._buffers.pop(queue, None)
        return list(buffer) if buffer else []

    def buffered_counts(self) -> dict[str, int]:
        """Caller holds ``cond``."""
        return {name: len(buffer) for name, buffer in self._buffers.items() if buffer}

    def _has_credit(self) -> bool:
        outstanding = len(self.held) + sum(len(buffer) for buffer in self._buffers.values())
        return outstanding < self.prefetch

    def _take(self, names: Sequence[str], max_messages: int) -> list[Arrival]:
        """Caller holds ``cond``. Highest priority first, then order of arrival."""
        buffers = [buffer for name in names if (buffer := self._buffers.get(name))]
        if not buffers:
            return []
        if len(buffers) == 1 and len(buffers[0]) <= max_messages:
            taken = list(buffers[0])
            buffers[0].clear()
        else:
            pool = sorted(
                (arrival for buffer in buffers for arrival in buffer),
                key=lambda arrival: (-arrival.priority, arrival.seq),
            )
            taken = pool[:max_messages]
            chosen = {id(arrival) for arrival in taken}
            for buffer in buffers:
                kept = [arrival for arrival in buffer if id(arrival) not in chosen]
                buffer.clear()
                buffer.extend(kept)
        taken.sort(key=lambda arrival: (-arrival.priority, arrival.seq))
        return taken


def _per_consumer_timeouts(connection: Any) -> bool:
    version = str(connection.server_properties.get("version", ""))
    try:
        parts = tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        return True  # an unusual version string: assume a recent server
    return parts >= (3, 11, 15)
