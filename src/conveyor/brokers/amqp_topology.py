"""Exchanges, queues and bindings on RabbitMQ, declared as Celery/kombu declare them.

:class:`Topology` owns the *admin* channel of a connection: declarations, passive checks
(does this exchange or queue exist, how deep is it), purges. Everything it declared is
declared again, in the same order, on every new connection, so a worker that reconnects
finds its queues, bindings and delay chain again (exclusive and auto-delete queues die with
the connection they belonged to).

A declaration RabbitMQ refuses closes the admin channel only (py-amqp reopens it), never
the channels that consume or publish.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from amqp import exceptions as amqp_errors  # type: ignore[import-untyped]
from conveyor.brokers.amqp_delay import BindSpec, DelayChain, ExchangeSpec, QueueSpec, Spec
from conveyor.errors import BrokerError, ConfigurationError, RoutingError
from conveyor.routing import DEFAULT_EXCHANGE, Binding, Exchange, Queue, route

logger = logging.getLogger("conveyor.broker.amqp")

NOT_FOUND = 404
PRECONDITION_FAILED = 406

DEAD_PREFIX = "conveyor.dead."


def dead_letter_queue(queue: str) -> str:
    """Where messages rejected without requeue from ``queue`` are kept."""
    return DEAD_PREFIX + queue


def _reserved(exchange: str) -> bool:
    # amq.* exchanges exist on every vhost and may only be declared passively.
    return exchange == DEFAULT_EXCHANGE or exchange.startswith("amq.")


def _forget_close(channel: Any) -> None:
    # The refusal was expected and handled here; the I/O thread need not report it.
    channel.closed_by_broker = None


class Topology:
    """The admin channel, and what this connection declared (replayed on reconnect)."""

    def __init__(self, *, default_queue_type: str | None = None) -> None:
        self.default_queue_type = default_queue_type
        self.channel: Any = None
        self._declared: dict[tuple[str, ...], Spec] = {}
        self._exchanges: dict[str, str] = {}  # name -> type, known to exist
        self._queues: dict[str, QueueSpec] = {}  # known to exist (declared or seen)
        self.known_queue_names: dict[str, None] = {}  # user queues this broker has used

    # -- Attachment ----------------------------------------------------------------------
    def attach(self, connection: Any) -> None:
        self.channel = connection.channel()
        self._exchanges.clear()
        self._queues.clear()
        for spec in list(self._declared.values()):
            try:
                self._declare(spec)
            except (BrokerError, ConfigurationError, RoutingError) as exc:
                logger.error("Could not declare %s again after reconnecting: %s", spec, exc)

    def detach(self) -> None:
        self.channel = None

    def channel_closed(self, channel: Any, code: int, text: str) -> None:
        if channel is self.channel:
            logger.debug("RabbitMQ closed the admin channel: %s %s", code, text)

    def work(self) -> bool:
        return False

    def after_io(self) -> None:
        pass

    # -- translating Conveyor's topology ----------------------------------------------------
    def queue_spec(self, queue: Queue) -> QueueSpec:
        arguments = queue.declared_arguments()
        if self.default_queue_type and "x-queue-type" not in arguments:
            arguments["x-queue-type"] = self.default_queue_type
        if arguments.get("x-queue-type") == "quorum":
            if queue.exclusive or queue.auto_delete or not queue.durable:
                raise ConfigurationError(
                    f"queue {queue.name!r}: quorum queues are durable, never exclusive "
                    "or auto-delete"
                )
            if "x-max-priority" in arguments:
                raise ConfigurationError(
                    f"queue {queue.name!r}: RabbitMQ quorum queues have no priorities "
                    "(x-max-priority); use a classic queue for priorities"
                )
        return QueueSpec(queue.name, queue.durable, queue.exclusive, queue.auto_delete, arguments)

    @staticmethod
    def exchange_spec(exchange: Exchange) -> ExchangeSpec:
        return ExchangeSpec(
            exchange.name,
            exchange.type,
            exchange.durable,
            exchange.auto_delete,
            dict(exchange.arguments),
        )

    # -- declaring (I/O thread) ------------------------------------------------------------
    def declare_exchange(self, exchange: Exchange) -> None:
        if _reserved(exchange.name):
            if exchange.name and not self.exchange_exists(exchange.name):
                raise RoutingError(f"exchange {exchange.name!r} does not exist")
            return
        self.apply(self.exchange_spec(exchange))

    def declare_queue(self, queue: Queue) -> None:
        """The queue, its exchange and every binding, as kombu's ``Queue.declare`` does."""
        self.declare_exchange(queue.effective_exchange)
        self.apply(self.queue_spec(queue))
        self.known_queue_names[queue.name] = None
        for binding in queue.all_bindings():
            self.bind(binding, ensure_queue=False)

    def bind(self, binding: Binding, *, ensure_queue: bool = True) -> None:
        if binding.exchange == DEFAULT_EXCHANGE:
            return  # every queue is bound to the nameless exchange; binding it is refused
        if not self.exchange_exists(binding.exchange):
            raise RoutingError(
                f"cannot bind queue {binding.queue!r}: exchange {binding.exchange!r} does not exist"
            )
        if ensure_queue:
            self.ensure_queue(binding.queue)
        self.apply(
            BindSpec(binding.exchange, binding.queue, binding.routing_key, dict(binding.arguments))
        )

    def ensure_queue(self, name: str) -> None:
        """Make sure a queue exists; create it as Celery would (durable, no arguments)."""
        if name in self._queues:
            return
        if self.queue_depth(name) is None:
            logger.info("Queue %r does not exist; declaring it (durable, no arguments)", name)
            self.apply(self.queue_spec(Queue(name)))
        self.known_queue_names[name] = None

    def ensure_chain(self, chain: DelayChain) -> None:
        if ("exchange", chain.entry) in self._declared:
            return
        for spec in chain.declarations():
            self.apply(spec)

    def apply(self, spec: Spec) -> None:
        key = _key(spec)
        if self._declared.get(key) == spec and self._is_known(spec):
            return
        self._declare(spec)
        self._declared[key] = spec

    def _is_known(self, spec: Spec) -> bool:
        if isinstance(spec, ExchangeSpec):
            return spec.name in self._exchanges
        if isinstance(spec, QueueSpec):
            return spec.name in self._queues
        return True

    def _declare(self, spec: Spec) -> None:
        channel = self.channel
        try:
            if isinstance(spec, ExchangeSpec):
                channel.exchange_declare(
                    spec.name,
                    spec.type,
                    durable=spec.durable,
                    auto_delete=spec.auto_delete,
                    arguments=spec.arguments,
                )
                self._exchanges[spec.name] = spec.type
            elif isinstance(spec, QueueSpec):
                channel.queue_declare(
                    spec.name,
                    durable=spec.durable,
                    exclusive=spec.exclusive,
                    auto_delete=spec.auto_delete,
                    arguments=spec.arguments,
                )
                self._queues[spec.name] = spec
            elif spec.to_exchange:
                channel.exchange_bind(
                    spec.destination, spec.source, spec.routing_key, arguments=spec.arguments
                )
            else:
                channel.queue_bind(
                    spec.destination, spec.source, spec.routing_key, arguments=spec.arguments
                )
        except amqp_errors.ChannelError as exc:
            _forget_close(channel)
            raise _declaration_error(spec, exc) from exc

    # -- what callers may read without the I/O thread (plain dict lookups) ------------------
    def knows_exchange(self, name: str) -> bool:
        return name in self._exchanges

    def knows_queue(self, name: str) -> bool:
        return name in self._queues

    def local_route(self, exchange: str, routing_key: str, headers: Mapping[str, Any]) -> list[str]:
        """The queues ``exchange`` routes to by the bindings *this* broker declared."""
        kind = self._exchanges.get(exchange)
        if kind is None or kind == "?":
            return []
        bindings = [
            Binding(spec.source, spec.destination, spec.routing_key, spec.arguments)
            for spec in self._declared.values()
            if isinstance(spec, BindSpec) and not spec.to_exchange and spec.source == exchange
        ]
        return route(kind, bindings, routing_key, headers)

    # -- passive checks (I/O thread) -------------------------------------------------------
    def exchange_exists(self, name: str) -> bool:
        if name == DEFAULT_EXCHANGE or name in self._exchanges:
            return True
        try:
            self.channel.exchange_declare(name, "direct", passive=True)
        except amqp_errors.NotFound:
            _forget_close(self.channel)
            return False
        self._exchanges[name] = "?"
        return True

    def forget_exchange(self, name: str) -> None:
        self._exchanges.pop(name, None)

    def queue_depth(self, name: str) -> int | None:
        """Messages ready in the queue (RabbitMQ's count), or None if it does not exist."""
        try:
            _, ready, _ = self.channel.queue_declare(name, passive=True)
        except amqp_errors.NotFound:
            _forget_close(self.channel)
            self._queues.pop(name, None)
            return None
        if name not in self._queues:
            self._queues[name] = QueueSpec(name)
        return int(ready)

    def purge(self, name: str) -> int:
        if self.queue_depth(name) is None:
            return 0
        return int(self.channel.queue_purge(name) or 0)

    def queue_type(self, name: str) -> str:
        spec = self._queues.get(name)
        if spec is None:
            return self.default_queue_type or "classic"
        return str(spec.arguments.get("x-queue-type", "classic"))

    def queue_arguments(self, name: str) -> Mapping[str, Any]:
        spec = self._queues.get(name)
        return spec.arguments if spec is not None else {}


def _key(spec: Spec) -> tuple[str, ...]:
    if isinstance(spec, ExchangeSpec):
        return ("exchange", spec.name)
    if isinstance(spec, QueueSpec):
        return ("queue", spec.name)
    return (
        "bind",
        spec.source,
        spec.destination,
        spec.routing_key,
        repr(sorted(spec.arguments.items())),
        str(spec.to_exchange),
    )


def _declaration_error(spec: Spec, exc: amqp_errors.ChannelError) -> Exception:
    code = getattr(exc, "reply_code", None) or getattr(exc, "code", None)
    text = getattr(exc, "reply_text", None) or str(exc)
    if isinstance(spec, ExchangeSpec):
        what = f"exchange {spec.name!r}"
    elif isinstance(spec, QueueSpec):
        what = f"queue {spec.name!r}"
    else:
        what = f"binding {spec.source!r} -> {spec.destination!r} ({spec.routing_key!r})"
    if code == PRECONDITION_FAILED:
        return ConfigurationError(
            f"RabbitMQ refused to declare {what}: it exists with other attributes "
            f"({text}); declare it exactly as its other users do, or delete it"
        )
    if code == NOT_FOUND:
        return RoutingError(f"cannot declare {what}: {text}")
    return BrokerError(f"RabbitMQ refused to declare {what}: {text}")
