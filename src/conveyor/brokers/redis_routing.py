"""Exchanges and bindings of the Redis broker, kept where kombu keeps them.

kombu stores bindings in Redis (``_kombu.binding.<exchange>``) but exchange *types* only
in each client's memory. Conveyor adds ``_conveyor.exchanges`` (name -> type), so its
clients agree on types and can refuse a redeclaration with another type, as RabbitMQ
does; an exchange only Celery declared is taken as direct, kombu's own default. Routing
decisions use the pure rules of :func:`conveyor.routing.route`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from conveyor.brokers.redis_layout import KeyLayout, encode_envelope, topic_pattern
from conveyor.brokers.virtual import encode_json, priority_of
from conveyor.envelope import Envelope
from conveyor.errors import ConfigurationError, RoutingError
from conveyor.redis_connection import as_text
from conveyor.routing import DEFAULT_EXCHANGE, Binding, Exchange, Queue, route

LISTED = "x-conveyor-listed"
"""Property on a fanout message Conveyor PUBLISHes: its bound Conveyor queues already
got a copy in their lists, so Conveyor subscribers skip it."""

_tag_lock = threading.Lock()
_tag_last = (0, 0)


def new_delivery_tag() -> str:
    """A unique tag (UUID-shaped, as kombu's) that sorts by creation time in this process,
    so messages delayed to the same moment come back in the order they were sent."""
    global _tag_last
    millis = time.time_ns() // 1_000_000
    with _tag_lock:
        last_millis, sequence = _tag_last
        sequence = sequence + 1 if millis <= last_millis else 0
        millis = max(millis, last_millis)
        if sequence > 0xFFFF:
            millis, sequence = millis + 1, 0
        _tag_last = (millis, sequence)
    text = f"{millis:012x}{sequence:04x}{os.urandom(8).hex()}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True)
class Route:
    queues: list[str]
    fanout_channel: str | None = None


class RedisTopology:
    def __init__(self, client: redis.Redis, layout: KeyLayout) -> None:
        self.client = client
        self.layout = layout
        self._types: dict[str, str] = {}
        self._known_queues: set[str] = set()
        self._fanout: dict[str, set[str]] = {}  # queue -> fanout exchanges it is bound to
        self._lock = threading.Lock()

    # -- exchanges ----------------------------------------------------------------------
    def declare_exchange(self, exchange: Exchange) -> None:
        if exchange.name == DEFAULT_EXCHANGE:
            return
        known = self._types.get(exchange.name)
        if known is None:
            self.client.hsetnx(self.layout.exchanges, exchange.name, exchange.type)
            stored = self.client.hget(self.layout.exchanges, exchange.name)
            known = as_text(stored) if stored else exchange.type
        if known != exchange.type:
            raise ConfigurationError(
                f"exchange {exchange.name!r} is already declared as {known!r}; "
                f"it cannot be redeclared as {exchange.type!r}"
            )
        self._types[exchange.name] = known

    def exchange_type(self, name: str) -> str | None:
        known = self._types.get(name)
        if known is not None:
            return known
        stored = self.client.hget(self.layout.exchanges, name)
        if stored is not None:
            self._types[name] = as_text(stored)
            return self._types[name]
        if self.client.exists(self.layout.binding_set(name)):
            return "direct"  # declared only by a Celery client: kombu's default type
        return None

    # -- queues and bindings ------------------------------------------------------------
    def declare_queue(self, queue: Queue) -> None:
        exchange = queue.effective_exchange
        self.declare_exchange(exchange)
        main, *extra = queue.all_bindings()
        for binding in (main, *extra):
            if binding.exchange == DEFAULT_EXCHANGE:
                self._check_default_binding(binding, implicit=binding is main)
                continue
            self._bind(binding, exchange.type if binding is main else None)
        self.client.sadd(self.layout.queues, queue.name)
        self._known_queues.add(queue.name)

    def bind(self, binding: Binding) -> None:
        if binding.exchange == DEFAULT_EXCHANGE:
            self._check_default_binding(binding, implicit=False)
            return
        self._bind(binding, None)
        self.client.sadd(self.layout.queues, binding.queue)

    @staticmethod
    def _check_default_binding(binding: Binding, *, implicit: bool) -> None:
        if not implicit and binding.routing_key != binding.queue:
            raise ConfigurationError(
                f"the default exchange cannot be bound (queue {binding.queue!r}, "
                f"routing key {binding.routing_key!r}); it reaches every queue by name"
            )

    def _bind(self, binding: Binding, exchange_type: str | None) -> None:
        kind = exchange_type or self.exchange_type(binding.exchange)
        if kind is None:
            raise RoutingError(
                f"cannot bind queue {binding.queue!r} to exchange {binding.exchange!r}: "
                "no such exchange (declare it first)"
            )
        layout = self.layout
        pattern = topic_pattern(binding.routing_key) if kind == "topic" else ""
        member = layout.binding_member(binding.routing_key, pattern, binding.queue)
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(layout.binding_set(binding.exchange), member)
        pipe.sadd(layout.permanent_binding_set(binding.exchange), member)
        if kind == "headers":
            arguments = encode_json(binding.arguments, "binding arguments", canonical=True)
            pipe.sadd(
                layout.headers_bindings(binding.exchange),
                json.dumps([binding.queue, binding.routing_key, arguments]),
            )
        if kind == "fanout":
            pipe.sadd(layout.fanout_queues(binding.exchange), binding.queue)
        pipe.execute()
        if kind == "fanout":
            with self._lock:
                self._fanout.setdefault(binding.queue, set()).add(binding.exchange)

    def _bindings(self, exchange: str, kind: str) -> list[Binding]:
        layout = self.layout
        if kind == "headers":
            found = []
            for raw in self.client.smembers(layout.headers_bindings(exchange)):
                queue, key, arguments = json.loads(raw)
                found.append(Binding(exchange, queue, key, json.loads(arguments)))
            return found
        bindings = []
        for raw in self.client.smembers(layout.binding_set(exchange)):
            parsed = layout.parse_binding_member(as_text(raw))
            if parsed is not None:
                bindings.append(Binding(exchange, parsed[2], parsed[0]))
        return sorted(bindings, key=lambda b: (b.queue, b.routing_key))

    def destinations(self, exchange: str, routing_key: str, headers: Mapping[str, Any]) -> Route:
        """Where a message goes; an unknown exchange is an error, no match drops it."""
        if exchange == DEFAULT_EXCHANGE:
            return Route([routing_key] if routing_key else [])
        kind = self.exchange_type(exchange)
        if kind is None:
            raise RoutingError(f"cannot publish to exchange {exchange!r}: no such exchange")
        queues = route(kind, self._bindings(exchange, kind), routing_key, headers)
        if kind != "fanout":
            return Route(queues)
        ours = {as_text(m) for m in self.client.smembers(self.layout.fanout_queues(exchange))}
        return Route(
            [q for q in queues if q in ours], self.layout.fanout_channel(exchange, routing_key)
        )

    def encode(
        self, envelope: Envelope, exchange: str, routing_key: str, tag: str, *, listed: bool = False
    ) -> str:
        return encode_envelope(
            envelope,
            exchange,
            routing_key,
            tag,
            extra_properties={LISTED: True} if listed else None,
        )

    # -- known queues (for stats()) -----------------------------------------------------
    def unknown_queues(self, queues: Iterable[str]) -> list[str]:
        return sorted(set(queues) - self._known_queues)

    def remember_queues(self, queues: Iterable[str]) -> None:
        self._known_queues.update(queues)

    # -- fanout subscriptions -----------------------------------------------------------
    def fanout_patterns(self, queues: Iterable[str]) -> set[str]:
        with self._lock:
            return {
                pattern
                for queue in queues
                for exchange in self._fanout.get(queue, ())
                for pattern in self.layout.fanout_subscriptions(exchange)
            }

    def queues_for_pattern(self, pattern: str) -> list[str]:
        with self._lock:
            return [
                queue
                for queue, exchanges in self._fanout.items()
                if any(
                    pattern in self.layout.fanout_subscriptions(exchange) for exchange in exchanges
                )
            ]

    @staticmethod
    def listed_copy(payload: bytes) -> bool:
        try:
            properties = json.loads(payload).get("properties") or {}
        except (ValueError, AttributeError):
            return False
        return bool(properties.get(LISTED))

    # -- restoring ----------------------------------------------------------------------
    def restore_plan(self, entry: bytes) -> tuple[str, list[str]] | None:
        """For an ``unacked`` entry ``[envelope, exchange, routing key]``: the envelope
        marked redelivered, and the lists kombu would push it back to."""
        from conveyor.brokers.redis_layout import decode_envelope, mark_redelivered

        document, exchange, routing_key = json.loads(entry)
        payload = mark_redelivered(json.dumps(document))
        stored = decode_envelope(payload)
        step = self.layout.step_of(priority_of(stored.envelope))
        target = self.destinations(
            str(exchange or ""), str(routing_key or ""), stored.envelope.headers
        )
        if not target.queues:
            return None
        return payload, [self.layout.list_key(queue, step) for queue in target.queues]
