"""Redis brokers and backends on keys of their own, for tests on the shared Redis.

Every object made here uses database 13 (``CONVEYOR_TEST_REDIS``) and a key prefix no
other test uses; closing it deletes the keys under that prefix, and nothing else.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from tests.conftest import REDIS_URL, require_service

import redis
from conveyor.backends.redis import RedisBackend
from conveyor.brokers.redis import RedisBroker


def scratch_prefix(label: str = "") -> str:
    return f"conveyor-test:{label}{uuid.uuid4().hex[:12]}:"


def delete_prefixed(url: str, prefix: str) -> int:
    """Delete the keys under ``prefix`` (never a FLUSHDB: the server is shared)."""
    client = redis.Redis.from_url(url, protocol=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


@contextmanager
def worker_env(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, label: str, visibility_timeout: float
) -> Iterator[dict[str, str]]:
    """``CONVEYOR_*`` variables (here and for worker processes) that put broker and
    backend on Redis under a key prefix of their own, deleted afterwards.

    The prefix rides in the URL: a suite may also run the CLI against other brokers with
    these variables set, and transport options are given to whichever broker."""
    prefix = scratch_prefix(label)
    url = f"{redis_url}?global_keyprefix={prefix}"
    values = {
        "CONVEYOR_BROKER_URL": url,
        "CONVEYOR_RESULT_BACKEND": url,
        "CONVEYOR_BROKER_TRANSPORT_OPTIONS": json.dumps(
            {"visibility_timeout": visibility_timeout}
        ),
        # A result a worker stores after the test deleted its keys expires soon anyway.
        "CONVEYOR_RESULT_EXPIRES": "600",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    try:
        yield {**os.environ, **values}
    finally:
        delete_prefixed(redis_url, prefix)


class ScratchRedisBroker(RedisBroker):
    """A Redis broker whose ``close`` also deletes its keys (tests close at teardown)."""

    def close(self) -> None:
        super().close()
        delete_prefixed(self.url, self.layout.prefix)


class ScratchRedisBackend(RedisBackend):
    def close(self) -> None:
        super().close()
        delete_prefixed(self.url, self.prefix)


_PREFIX_BY_STORE: dict[str, str] = {}


def contract_broker(store: object, visibility_timeout: float, **options: Any) -> RedisBroker:
    """A broker on the store named by ``store`` (a test's tmp_path): brokers made for
    the same store share one prefix, as the broker contract suite expects."""
    require_service("Redis", "127.0.0.1", 6379)
    prefix = _PREFIX_BY_STORE.setdefault(str(store), scratch_prefix("contract-"))
    return ScratchRedisBroker(
        REDIS_URL, visibility_timeout=visibility_timeout, global_keyprefix=prefix, **options
    )


def contract_backend(url: str) -> Any:
    """A factory of backends sharing one key prefix, as the backend contract expects."""
    prefix = scratch_prefix("results-")
    return lambda **options: ScratchRedisBackend(url, global_keyprefix=prefix, **options)
