"""What brokers without native exchanges (memory, SQLite, Redis) share.

AMQP exchanges and bindings are, for these brokers, bookkeeping plus the pure rules of
:func:`conveyor.routing.route`. :class:`Topology` is that bookkeeping, with the checks
RabbitMQ makes (an unknown exchange is an error, an exchange keeps its type, the default
exchange cannot be bound). :class:`Doorbell` and :class:`WakeRequests` are the two
signals a blocking ``fetch`` waits for: a publish in this process, and ``wake()``.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.envelope import Envelope
from conveyor.errors import ConfigurationError, EncodeError, RoutingError
from conveyor.routing import DEFAULT_EXCHANGE, Binding, Exchange, Queue, route

MAX_PRIORITY = 9
"""Priorities are 0-9 as the broker contract says; values outside are clamped."""

BindingKey = tuple[str, str, str, str]


def priority_of(envelope: Envelope) -> int:
    return min(MAX_PRIORITY, max(0, envelope.priority))


def new_lease_token() -> str:
    return secrets.token_hex(16)


def unique_queue_names(queues: Sequence[str], max_messages: int) -> list[str]:
    """Validate ``fetch`` arguments; return the queue names in order, each once."""
    if isinstance(queues, str):
        raise TypeError("fetch() takes a sequence of queue names, not one string")
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, not {max_messages}")
    names = list(dict.fromkeys(queues))
    if not names:
        raise ValueError("fetch() needs at least one queue name")
    return names


def encode_json(value: Mapping[str, Any], what: str, *, canonical: bool = False) -> str:
    """Compact JSON for headers, properties and binding arguments.

    ``canonical`` sorts keys so equal mappings give equal text (bindings are told apart
    by it); headers keep their order. Non-ASCII is escaped so that even a lone surrogate
    (a file name decoded with ``surrogateescape``) survives storage as UTF-8 text.
    """
    try:
        return json.dumps(dict(value), sort_keys=canonical, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"{what} must be JSON-serializable: {exc}") from exc


def binding_arguments_json(binding: Binding) -> str:
    what = f"arguments of the binding of {binding.queue!r}"
    return encode_json(binding.arguments, what, canonical=True)


def binding_key(binding: Binding) -> BindingKey:
    return (binding.exchange, binding.queue, binding.routing_key, binding_arguments_json(binding))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message rejected without requeue, kept with the reason it was given."""

    envelope: Envelope
    queue: str
    exchange: str
    routing_key: str
    delivery_count: int
    reason: str
    dead_at: float


@dataclass(frozen=True, slots=True)
class TopologyChange:
    """Exchanges and bindings a declaration adds; empty when it adds nothing."""

    exchanges: tuple[Exchange, ...] = ()
    bindings: tuple[Binding, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.exchanges or self.bindings)


class Topology:
    """Exchange types and bindings, validated the way RabbitMQ validates them.

    ``plan_*`` methods never mutate: they check a declaration and return what it would
    add, so a broker can write that to its store first and :meth:`apply` it after.
    Not thread-safe; brokers guard it with their own lock.
    """

    def __init__(self) -> None:
        self.exchange_types: dict[str, str] = {}
        self._bindings: dict[str, dict[BindingKey, Binding]] = {}

    def plan_exchange(self, exchange: Exchange) -> TopologyChange:
        if exchange.name == DEFAULT_EXCHANGE:
            return TopologyChange()
        known = self.exchange_types.get(exchange.name)
        if known is None:
            return TopologyChange(exchanges=(exchange,))
        if known != exchange.type:
            # RabbitMQ refuses this too (PRECONDITION_FAILED): silently keeping the old
            # type would route differently from what the caller declared.
            raise ConfigurationError(
                f"exchange {exchange.name!r} is already declared as {known!r}; "
                f"it cannot be redeclared as {exchange.type!r}"
            )
        return TopologyChange()

    def plan_binding(self, binding: Binding) -> TopologyChange:
        return self._plan_bindings([binding], {}, implicit=())

    def plan_queue(self, queue: Queue) -> TopologyChange:
        exchange = queue.effective_exchange
        new_exchanges = self.plan_exchange(exchange).exchanges
        main, *extra = queue.all_bindings()
        # As in kombu, a queue whose own exchange is the nameless one gets no binding:
        # the default exchange already reaches every queue by name.
        implicit = (main,) if main.exchange == DEFAULT_EXCHANGE else ()
        pending = {e.name: e.type for e in new_exchanges}
        change = self._plan_bindings([main, *extra], pending, implicit)
        return TopologyChange(new_exchanges, change.bindings)

    def _plan_bindings(
        self, bindings: Iterable[Binding], pending: Mapping[str, str], implicit: Sequence[Binding]
    ) -> TopologyChange:
        new: dict[BindingKey, Binding] = {}
        for binding in bindings:
            if binding.exchange == DEFAULT_EXCHANGE:
                if binding in implicit or binding.routing_key == binding.queue:
                    continue
                raise ConfigurationError(
                    f"the default exchange cannot be bound (queue {binding.queue!r}, "
                    f"routing key {binding.routing_key!r}); it reaches every queue by name"
                )
            if binding.exchange not in self.exchange_types and binding.exchange not in pending:
                raise RoutingError(
                    f"cannot bind queue {binding.queue!r} to exchange {binding.exchange!r}: "
                    "no such exchange (declare it first)"
                )
            key = binding_key(binding)
            if key not in self._bindings.get(binding.exchange, {}):
                new.setdefault(key, binding)
        return TopologyChange(bindings=tuple(new.values()))

    def apply(self, change: TopologyChange) -> None:
        for exchange in change.exchanges:
            self.exchange_types[exchange.name] = exchange.type
        for binding in change.bindings:
            self._bindings.setdefault(binding.exchange, {})[binding_key(binding)] = binding

    def destinations(
        self, exchange: str, routing_key: str, headers: Mapping[str, Any]
    ) -> list[str]:
        """The queues a message reaches; [] when it is unroutable (and so dropped)."""
        if exchange == DEFAULT_EXCHANGE:
            return [routing_key] if routing_key else []
        exchange_type = self.exchange_types.get(exchange)
        if exchange_type is None:
            # AMQP closes the channel with 404 NOT_FOUND; a dropped message would be worse.
            raise RoutingError(f"cannot publish to exchange {exchange!r}: no such exchange")
        return route(exchange_type, self._bindings.get(exchange, {}).values(), routing_key, headers)


class Doorbell:
    """Rung on every publish; shared by all broker objects over one store in a process."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.rings = 0

    def ring(self) -> None:
        with self.condition:
            self.rings += 1
            self.condition.notify_all()


class WakeRequests:
    """``wake()`` of one broker object: ends its fetches that are blocked or about to block.

    A request made while no fetch is blocked stays pending for the next fetch that
    would block, so a shutdown racing with the start of a fetch is never lost. Every
    method except :meth:`request` must be called with the doorbell's condition held.
    """

    def __init__(self, doorbell: Doorbell) -> None:
        self._doorbell = doorbell
        self._count = 0
        self._pending = False

    def request(self) -> None:
        with self._doorbell.condition:
            self._count += 1
            self._pending = True
            self._doorbell.condition.notify_all()

    def mark(self) -> int:
        return self._count

    def consume(self, mark: int) -> bool:
        """True if a wake is pending or was requested since ``mark``; clears the pending one."""
        requested = self._pending or self._count != mark
        self._pending = False
        return requested
