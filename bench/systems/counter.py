"""The one Redis INCR every counted task does, so the harness can count executions.

Clients are made on first use in each process (and each event loop): a prefork child
must never share the socket of the parent it was forked from.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import redis
from bench.settings import AppEnv

_lock = threading.Lock()
_client: tuple[int, redis.Redis] | None = None
_async_clients: dict[int, Any] = {}


def _sync_client(url: str) -> redis.Redis:
    global _client
    pid = os.getpid()
    current = _client
    if current is None or current[0] != pid:
        with _lock:
            current = _client
            if current is None or current[0] != pid:
                current = (pid, redis.Redis.from_url(url))
                _client = current
    return current[1]


def incr(env: AppEnv) -> None:
    _sync_client(env.counter_url).incr(env.counter_key)


async def aincr(env: AppEnv) -> None:
    """INCR without blocking the event loop (an async task shares it with 99 others)."""
    import redis.asyncio as aredis

    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = aredis.Redis.from_url(env.counter_url)
        _async_clients[loop_id] = client
    await client.incr(env.counter_key)
