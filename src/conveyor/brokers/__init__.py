"""Brokers by URL scheme. Each is imported only when its URL is used, so a missing
extra is reported by name when it matters and never at import time."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from conveyor.brokers.base import Broker, QueueStats
from conveyor.errors import ConfigurationError

__all__ = ["BROKER_SCHEMES", "Broker", "QueueStats", "broker_from_url"]

BROKER_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("conveyor.brokers.memory", "MemoryBroker", None),
    "sqlite": ("conveyor.brokers.sqlite", "SqliteBroker", None),
    "redis": ("conveyor.brokers.redis", "RedisBroker", "redis"),
    "rediss": ("conveyor.brokers.redis", "RedisBroker", "redis"),
    "redis+socket": ("conveyor.brokers.redis", "RedisBroker", "redis"),
    "sentinel": ("conveyor.brokers.redis", "RedisBroker", "redis"),
    "amqp": ("conveyor.brokers.amqp", "AmqpBroker", "amqp"),
    "amqps": ("conveyor.brokers.amqp", "AmqpBroker", "amqp"),
    "pyamqp": ("conveyor.brokers.amqp", "AmqpBroker", "amqp"),
}
"""scheme -> (module, class, the pip extra it needs)."""


def scheme_of(url: str) -> str:
    if "://" not in url:
        raise ConfigurationError(f"broker URL {url!r} has no scheme (like sqlite:///path.db)")
    return url.split("://", 1)[0].lower()


def load_class(table: Mapping[str, tuple[str, str, str | None]], scheme: str, what: str) -> Any:
    if scheme not in table:
        raise ConfigurationError(
            f"unknown {what} scheme {scheme!r}; known schemes: {', '.join(sorted(table))}")
    module_name, class_name, extra = table[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None:
            raise
        raise ConfigurationError(
            f"the {scheme}:// {what} needs the {extra!r} extra: "
            f"pip install 'conveyor[{extra}]' ({exc})") from exc
    return getattr(module, class_name)


def broker_from_url(
    url: str,
    *,
    transport_options: Mapping[str, Any] | None = None,
    visibility_timeout: float = 3600.0,
) -> Broker:
    cls = load_class(BROKER_SCHEMES, scheme_of(url), "broker")
    options = dict(transport_options or {})
    options.pop("visibility_timeout", None)
    broker: Broker = cls(url, visibility_timeout=visibility_timeout, **options)
    return broker
