"""Exchanges, queues and bindings, and the pure matching rules of AMQP 0-9-1.

Brokers without native exchanges (memory, SQLite, Redis) route with :func:`route`,
so every broker delivers a message to exactly the same queues RabbitMQ would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from conveyor.errors import ConfigurationError

ExchangeType = Literal["direct", "topic", "fanout", "headers"]
EXCHANGE_TYPES: frozenset[str] = frozenset({"direct", "topic", "fanout", "headers"})

DEFAULT_EXCHANGE = ""
"""The nameless exchange: the routing key is the queue name."""


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: ExchangeType = "direct"
    durable: bool = True
    auto_delete: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EXCHANGE_TYPES:
            raise ConfigurationError(
                f"unknown exchange type {self.type!r} for exchange {self.name!r}; "
                f"use one of {sorted(EXCHANGE_TYPES)}"
            )


@dataclass(frozen=True, slots=True)
class Binding:
    """A rule that copies messages from an exchange into a queue."""

    exchange: str
    queue: str
    routing_key: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue, with the exchange and routing key it is bound by (Celery's defaults).

    ``bindings`` adds further bindings, for a queue fed by several exchanges or keys.
    ``binding_arguments`` are the arguments of the main binding (headers exchanges).
    """

    name: str
    exchange: Exchange | None = None
    routing_key: str | None = None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    max_priority: int | None = None
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)
    binding_arguments: Mapping[str, Any] = field(default_factory=dict)
    bindings: tuple[Binding, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigurationError("a queue needs a name")

    @property
    def effective_exchange(self) -> Exchange:
        return self.exchange if self.exchange is not None else Exchange(self.name, "direct")

    @property
    def effective_routing_key(self) -> str:
        return self.name if self.routing_key is None else self.routing_key

    def all_bindings(self) -> tuple[Binding, ...]:
        main = Binding(
            self.effective_exchange.name,
            self.name,
            self.effective_routing_key,
            dict(self.binding_arguments),
        )
        return (main, *self.bindings)

    def declared_arguments(self) -> dict[str, Any]:
        arguments = dict(self.queue_arguments)
        if self.max_priority is not None:
            arguments.setdefault("x-max-priority", self.max_priority)
        return arguments




def topic_matches(pattern: str, routing_key: str) -> bool:
    """True if ``routing_key`` matches the topic binding ``pattern``."""
    if pattern == "#":
        return True
    if "*" not in pattern and "#" not in pattern:
        return pattern == routing_key
    # RabbitMQ splits an empty routing key into no words at all, so '*' cannot match it.
    words = routing_key.split(".") if routing_key else []
    return _topic_words_match(pattern.split("."), words)


def _topic_words_match(pattern: list[str], words: list[str]) -> bool:
    # Explicit word matching: regexes get the dot rules of '#' subtly wrong.
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_words_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    if head in ("*", words[0]):
        return _topic_words_match(rest, words[1:])
    return False


def headers_match(arguments: Mapping[str, Any], headers: Mapping[str, Any]) -> bool:
    """AMQP headers exchange rule: ``x-match`` is ``all`` (default) or ``any``."""
    mode = str(arguments.get("x-match", "all")).lower()
    wanted = {k: v for k, v in arguments.items() if not k.startswith("x-")}
    if not wanted:
        return mode == "all"
    hits = (key in headers and (value is None or headers[key] == value)
            for key, value in wanted.items())
    return any(hits) if mode == "any" else all(hits)


def binding_matches(
    exchange_type: str,
    binding: Binding,
    routing_key: str,
    headers: Mapping[str, Any],
) -> bool:
    if exchange_type == "fanout":
        return True
    if exchange_type == "direct":
        return binding.routing_key == routing_key
    if exchange_type == "topic":
        return topic_matches(binding.routing_key, routing_key)
    if exchange_type == "headers":
        return headers_match(binding.arguments, headers)
    raise ConfigurationError(f"unknown exchange type {exchange_type!r}")


def route(
    exchange_type: str,
    bindings: Iterable[Binding],
    routing_key: str,
    headers: Mapping[str, Any],
) -> list[str]:
    """The queues (each once, in binding order) a message published to an exchange reaches."""
    seen: dict[str, None] = {}
    for binding in bindings:
        if binding.queue not in seen and binding_matches(
            exchange_type, binding, routing_key, headers
        ):
            seen[binding.queue] = None
    return list(seen)
