"""Where a task call goes: ``task_routes`` and call options resolved to a publish target.

Celery's rules (PROTOCOL.md 2.1, 2.2): explicit ``queue``/``exchange``/``routing_key``
options win; then the first of ``task_routes`` that answers (exact name, glob, or a
callable); then ``task_default_queue``. A route through a direct exchange is published
to the nameless exchange with the queue name as routing key, unless the caller gave both
an exchange and a routing key.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.config import Settings
from conveyor.errors import ConfigurationError, RoutingError
from conveyor.routing import DEFAULT_EXCHANGE, Exchange, Queue


@dataclass(frozen=True, slots=True)
class Target:
    """Where to publish, and the queue to declare first (if known)."""

    exchange: str
    routing_key: str
    queue: Queue | None
    priority: int | None = None
    declare_exchange: Exchange | None = None
    bound_queues: tuple[Queue, ...] = ()
    """Configured queues bound to ``exchange``: declared before the first publish, so a
    message sent before any worker started is not dropped as unroutable."""


def _glob_table(table: Mapping[str, Any]) -> Callable[..., Any]:
    exact = {k: v for k, v in table.items() if not any(c in k for c in "*?[")}
    patterns = [(k, v) for k, v in table.items() if k not in exact]

    def lookup(name: str, *_: Any, **__: Any) -> Any:
        if name in exact:
            return exact[name]
        for pattern, route in patterns:
            if fnmatch.fnmatchcase(name, pattern):
                return route
        return None

    return lookup


def _full_signature(router: Callable[..., Any]) -> Callable[..., Any]:
    """Call every router as ``(name, args, kwargs, options)``, whatever it accepts."""
    try:
        inspect.signature(router).bind("name", (), {}, {})
    except TypeError:
        return lambda name, *_: router(name)
    except ValueError:  # builtins without a signature: trust the full form
        pass
    return router


def _routers(task_routes: Any) -> list[Callable[..., Any]]:
    if task_routes is None:
        return []
    if isinstance(task_routes, Mapping):
        return [_glob_table(task_routes)]
    if callable(task_routes):
        return [_full_signature(task_routes)]
    if isinstance(task_routes, Sequence) and not isinstance(task_routes, str):
        found: list[Callable[..., Any]] = []
        for item in task_routes:
            found.extend(_routers(item))
        return found
    raise ConfigurationError(f"task_routes must be a mapping, a callable or a list of them, "
                             f"not {type(task_routes).__name__}")


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.routers = _routers(settings.task_routes)
        self.queues: dict[str, Queue] = {q.name: q for q in self._configured_queues()}

    def _configured_queues(self) -> list[Queue]:
        result: list[Queue] = []
        for item in self.settings.task_queues or ():
            if isinstance(item, Queue):
                result.append(item)
            elif isinstance(item, str):
                result.append(self.missing_queue(item))
            else:
                raise ConfigurationError(f"task_queues holds a {type(item).__name__}; "
                                         "use conveyor.Queue(...) or a queue name")
        return result

    def missing_queue(self, name: str) -> Queue:
        s = self.settings
        if name == s.task_default_queue:
            exchange = Exchange(s.task_default_exchange or name, s.task_default_exchange_type)  # type: ignore[arg-type]
            return Queue(name, exchange, s.task_default_routing_key or name,
                         max_priority=s.task_queue_max_priority)
        return Queue(name, Exchange(name, "direct"), name, max_priority=s.task_queue_max_priority)

    def queue(self, name: str) -> Queue:
        if name in self.queues:
            return self.queues[name]
        if not self.settings.task_create_missing_queues:
            raise RoutingError(f"queue {name!r} is not in task_queues and "
                               "task_create_missing_queues is off")
        queue = self.missing_queue(name)
        self.queues[name] = queue
        return queue

    def bound_to(self, exchange: str) -> tuple[Queue, ...]:
        return tuple(q for q in self.queues.values()
                     if any(b.exchange == exchange for b in q.all_bindings()))

    def consumed_queues(self, names: Sequence[str] | None) -> list[Queue]:
        if names:
            return [self.queue(name) for name in names]
        if self.settings.task_queues:
            return list(self.queues.values())
        return [self.queue(self.settings.task_default_queue)]

    def _route_for(self, name: str, args: Any, kwargs: Any, options: Mapping[str, Any]) -> Any:
        for router in self.routers:
            found = router(name, args, kwargs, options)
            if found is not None:
                return found
        return None

    def resolve(
        self,
        name: str,
        args: Any = (),
        kwargs: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> Target:
        options = options or {}
        route: dict[str, Any] = {}
        found = self._route_for(name, args, kwargs or {}, options)
        if isinstance(found, str):
            route["queue"] = found
        elif isinstance(found, Mapping):
            route.update(found)
        elif found is not None:
            raise RoutingError(f"router for {name!r} returned {found!r}; "
                               "routes are queue names or mappings")
        for key in ("queue", "exchange", "routing_key", "priority", "exchange_type"):
            if options.get(key) is not None:
                route[key] = options[key]
        return self._target(route, explicit=options)

    def _target(self, route: Mapping[str, Any], explicit: Mapping[str, Any]) -> Target:
        priority = route.get("priority")
        queue_option = route.get("queue")
        queue: Queue | None = None
        if isinstance(queue_option, Queue):
            queue = queue_option
        elif queue_option:
            queue = self.queue(str(queue_option))
        exchange_option = route.get("exchange")
        routing_key = route.get("routing_key")
        if exchange_option is None and queue is None:
            queue = self.queue(self.settings.task_default_queue)
        if exchange_option is not None:
            exchange = exchange_option.name if isinstance(exchange_option, Exchange) else str(
                exchange_option)
            if routing_key is None:
                routing_key = queue.effective_routing_key if queue else ""
            both_explicit = explicit.get("exchange") is not None and explicit.get(
                "routing_key") is not None
            exchange_type = (exchange_option.type if isinstance(exchange_option, Exchange)
                             else route.get("exchange_type"))
            if queue is not None and exchange_type == "direct" and not both_explicit:
                return Target(DEFAULT_EXCHANGE, queue.name, queue, priority)
            declared = exchange_option if isinstance(exchange_option, Exchange) else None
            return Target(exchange, str(routing_key), queue, priority, declared,
                          self.bound_to(exchange))
        assert queue is not None
        exchange_obj = queue.effective_exchange
        if exchange_obj.type == "direct" and routing_key is None:
            return Target(DEFAULT_EXCHANGE, queue.name, queue, priority)
        return Target(exchange_obj.name, str(routing_key or queue.effective_routing_key),
                      queue, priority)
