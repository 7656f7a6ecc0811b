"""What Redis ran while a test did something, in order, read from Redis's MONITOR."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from conveyor.brokers import redis_scripts

SCRIPT_NAMES = {hashlib.sha1(getattr(redis_scripts, name).encode()).hexdigest(): name
                for name in ("ACK", "FETCH")}


@contextmanager
def monitored(url: str, timeout: float = 10.0) -> Iterator[list[tuple[str, str]]]:
    """``(client, what)`` for each command clients sent meanwhile, in the order Redis
    ran them: the broker's ack and fetch scripts as ``ACK`` and ``FETCH``, any other
    script as ``script``, anything else by its command's name. Commands a script ran
    are left out. The list is complete when the block ends."""
    seen: list[tuple[str, str]] = []

    def watch(monitor: Any) -> None:
        while True:
            item = monitor.next_command()
            command = item["command"]
            if command == "ECHO monitored-end":
                return
            if item["client_type"] == "lua":
                continue
            words = command.split()
            what = SCRIPT_NAMES.get(words[1], "script") if words[0] == "EVALSHA" else words[0]
            seen.append((f"{item['client_address']}:{item['client_port']}", what))

    watcher, pinger = redis.Redis.from_url(url), redis.Redis.from_url(url)
    try:
        with watcher.monitor() as monitor:
            thread = threading.Thread(target=watch, args=(monitor,))
            thread.start()
            try:
                yield seen
            finally:
                pinger.execute_command("ECHO", "monitored-end")
                thread.join(timeout=timeout)
    finally:
        watcher.close()
        pinger.close()
