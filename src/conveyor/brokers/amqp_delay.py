"""Delayed delivery inside RabbitMQ: a chain of TTL queues, no plugin, no unacked message.

A message delayed by ``d`` milliseconds travels through the *levels* whose bit is set in
``d``, highest first. Level ``i`` is a queue where every message lives exactly ``2**i`` ms
(``x-message-ttl``), so its order of arrival is its order of expiry and no message waits
behind a longer one; an expired message is dead-lettered to the exchange of the next
level. Each level's exchange (topic) sends a message into its own queue or straight on to
the next exchange, by one word of the routing key: the bit of that level. After level 0
the message reaches ``<prefix>.due``, which routes it by the first word of the routing key
to its *landing queue*: one per destination (exchange, routing key), with TTL 0 and that
exchange and key as its dead-letter target, so the message leaves at once and is routed as
if it were published now, through the exchange it was meant for.

Nothing here holds a delivery unacknowledged, so RabbitMQ's ``consumer_timeout`` never
applies; a delay survives worker and broker restarts (the queues are durable).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

LEVELS = 32
MAX_DELAY_MS: int = (1 << LEVELS) - 1
"""About 49.7 days; a longer delay waits this long, then a task's eta is checked again."""
LANDING_GRACE = 2.0
"""Seconds a delayed message is still counted past due: it may be crossing the last hops."""


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BindSpec:
    source: str
    destination: str
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict)
    to_exchange: bool = False


Spec = ExchangeSpec | QueueSpec | BindSpec

QUORUM_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    # Quorum queues can dead-letter at-least-once; classic queues only at-most-once.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def delay_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (a delayed message never arrives early)."""
    return max(0, min(MAX_DELAY_MS, math.ceil(seconds * 1000)))


@dataclass(frozen=True, slots=True)
class DelayChain:
    """Names and declarations of one chain (classic and quorum chains never share names)."""

    quorum: bool = False

    @property
    def prefix(self) -> str:
        return "conveyor.qdelay" if self.quorum else "conveyor.delay"

    @property
    def entry(self) -> str:
        """The exchange every delayed message is published to."""
        return self.level(LEVELS - 1)

    @property
    def due(self) -> str:
        return f"{self.prefix}.due"

    def level(self, index: int) -> str:
        return f"{self.prefix}.{index:02d}"

    def owns(self, queue: str) -> bool:
        return queue.startswith(self.prefix + ".")

    def _arguments(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, **(QUORUM_ARGUMENTS if self.quorum else {})}

    def declarations(self) -> list[Spec]:
        specs: list[Spec] = [ExchangeSpec(self.due, "topic")]
        specs += [ExchangeSpec(self.level(i), "topic") for i in range(LEVELS)]
        for i in range(LEVELS):
            name = self.level(i)
            onward = self.level(i - 1) if i else self.due
            specs.append(
                QueueSpec(
                    name,
                    arguments=self._arguments(
                        {"x-message-ttl": 2**i, "x-dead-letter-exchange": onward}
                    ),
                )
            )
            specs.append(BindSpec(name, name, _bit_pattern(i, "1")))
            specs.append(BindSpec(name, onward, _bit_pattern(i, "0"), to_exchange=True))
        return specs

    def landing(self, exchange: str, routing_key: str) -> tuple[str, list[Spec]]:
        """The landing id for a destination, and the declarations of its landing queue."""
        digest = hashlib.sha256(f"{exchange}\x00{routing_key}".encode()).hexdigest()[:24]
        name = f"{self.prefix}.to.{digest}"
        queue = QueueSpec(
            name,
            arguments=self._arguments(
                {
                    "x-message-ttl": 0,
                    "x-dead-letter-exchange": exchange,
                    "x-dead-letter-routing-key": routing_key,
                }
            ),
        )
        return digest, [queue, BindSpec(self.due, name, f"{digest}.#")]

    @staticmethod
    def routing_key(landing_id: str, millis: int) -> str:
        bits = ".".join(str((millis >> bit) & 1) for bit in reversed(range(LEVELS)))
        return f"{landing_id}.{bits}"


def _bit_pattern(level: int, value: str) -> str:
    words = (value if bit == level else "*" for bit in reversed(range(LEVELS)))
    return "*." + ".".join(words)


def strip_chain_headers(headers: dict[str, Any], chain_prefixes: tuple[str, ...]) -> None:
    """Remove the ``x-death`` bookkeeping RabbitMQ added while a message crossed a chain.

    Only entries about our chain queues go: a user's own dead-lettering stays visible.
    """
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        kept = [
            entry
            for entry in deaths
            if not (
                isinstance(entry, dict) and str(entry.get("queue", "")).startswith(chain_prefixes)
            )
        ]
        if kept:
            headers["x-death"] = kept
        else:
            del headers["x-death"]
    first = headers.get("x-first-death-queue")
    if isinstance(first, str) and first.startswith(chain_prefixes):
        for key in ("x-first-death-queue", "x-first-death-exchange", "x-first-death-reason"):
            headers.pop(key, None)
    last = headers.get("x-last-death-queue")
    if isinstance(last, str) and last.startswith(chain_prefixes):
        for key in ("x-last-death-queue", "x-last-death-exchange", "x-last-death-reason"):
            headers.pop(key, None)


class DelayedCounts:
    """Messages this process delayed, by destination queue, until they are due.

    RabbitMQ can't say which queue a message in the chain is for, so ``stats().delayed``
    counts what this process sent. A message is counted a little past due (counted twice
    for a moment rather than not at all), or until this process receives it.
    """

    def __init__(self) -> None:
        self._dues: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, queues: Iterable[str], seconds: float) -> None:
        due = time.monotonic() + seconds
        with self._lock:
            for queue in queues:
                heapq.heappush(self._dues.setdefault(queue, []), due)

    def landed(self, queue: str) -> None:
        with self._lock:
            dues = self._dues.get(queue)
            if dues:
                heapq.heappop(dues)

    def count(self, queue: str) -> int:
        with self._lock:
            dues = self._dues.get(queue)
            if not dues:
                return 0
            past = time.monotonic() - LANDING_GRACE
            while dues and dues[0] <= past:
                heapq.heappop(dues)
            return len(dues)
