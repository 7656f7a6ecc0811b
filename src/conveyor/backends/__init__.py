"""Result backends by URL scheme, imported only when their URL is used."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from conveyor.backends.base import ResultBackend
from conveyor.brokers import load_class, scheme_of

__all__ = ["BACKEND_SCHEMES", "ResultBackend", "backend_from_url"]

BACKEND_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("conveyor.backends.memory", "MemoryBackend", None),
    "sqlite": ("conveyor.backends.sqlite", "SqliteBackend", None),
    "redis": ("conveyor.backends.redis", "RedisBackend", "redis"),
    "rediss": ("conveyor.backends.redis", "RedisBackend", "redis"),
    "redis+socket": ("conveyor.backends.redis", "RedisBackend", "redis"),
    "sentinel": ("conveyor.backends.redis", "RedisBackend", "redis"),
    "rpc": ("conveyor.backends.rpc", "RpcBackend", "amqp"),
    "db+postgresql": ("conveyor.backends.sql", "SqlBackend", "sql"),
    "db+postgresql+psycopg": ("conveyor.backends.sql", "SqlBackend", "sql"),
    "db+mysql": ("conveyor.backends.sql", "SqlBackend", "sql"),
    "db+mysql+pymysql": ("conveyor.backends.sql", "SqlBackend", "sql"),
    "db+sqlite": ("conveyor.backends.sql", "SqlBackend", "sql"),
    "cache+memcached": ("conveyor.backends.memcached", "MemcachedBackend", "memcached"),
}


def backend_from_url(
    url: str,
    *,
    serializer: str = "json",
    accept: Iterable[str] = ("json",),
    expires: float | None = 86400.0,
    transport_options: Mapping[str, Any] | None = None,
    broker_url: str | None = None,
) -> ResultBackend:
    scheme = scheme_of(url)
    cls = load_class(BACKEND_SCHEMES, scheme, "result backend")
    options = dict(transport_options or {})
    if scheme == "rpc":
        options["broker_url"] = broker_url  # rpc:// results travel through the broker
    backend: ResultBackend = cls(url, serializer=serializer, accept=accept, expires=expires,
                                 **options)
    return backend
