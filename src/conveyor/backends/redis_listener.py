"""One pub/sub connection and thread per Redis result backend, shared by every waiter.

A waiter registers its channel (``celery-task-meta-<id>``); the first waiter of a channel
sends SUBSCRIBE, the last one to leave sends UNSUBSCRIBE, so nothing leaks however many
``get()`` calls time out. Sending happens in the waiter's thread (under a lock); only the
listener thread reads, and it tells waiters when their subscription is confirmed (the
moment after which reading the key cannot miss a result) and hands them published values.
If the connection drops, the thread reconnects with backoff, resubscribes, and every
waiter reads its key again, since a result may have been stored meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from conveyor.redis_connection import RawConnection, RedisClients

logger = logging.getLogger("conveyor.backends.redis")

RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
IDLE_READ = 5.0  # how long one read waits; only bounds how fast close() is noticed


class Waiter:
    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self._event = threading.Event()
        self._payloads: deque[bytes] = deque()
        self._subscribed = False
        self._read_since_subscribed = False

    # -- called by the listener thread ------------------------------------------------
    def confirmed(self) -> None:
        self._subscribed = True
        self._event.set()

    def lost(self) -> None:
        self._subscribed = False
        self._read_since_subscribed = False
        self._event.set()

    def deliver(self, payload: bytes) -> None:
        self._payloads.append(payload)
        self._event.set()

    # -- called by the waiting thread -------------------------------------------------
    def needs_read(self) -> bool:
        """True once per confirmed subscription: then the key must be read."""
        self._event.clear()
        if self._subscribed and not self._read_since_subscribed:
            self._read_since_subscribed = True
            return True
        return False

    def published(self) -> Iterator[bytes]:
        while self._payloads:
            yield self._payloads.popleft()

    def sleep(self, deadline: float | None) -> bool:
        """Wait for news until ``deadline`` (monotonic); False once it has passed."""
        if deadline is None:
            self._event.wait()
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._event.wait(remaining)
        return True


class ResultListener:
    def __init__(self, clients: RedisClients, where: str) -> None:
        self._clients = clients
        self._where = where
        self._lock = threading.Lock()
        self._waiters: dict[bytes, set[Waiter]] = {}
        self._confirmed: set[bytes] = set()
        self._connection: RawConnection | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="conveyor-redis-results", daemon=True
        )
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @contextmanager
    def watching(self, channel: bytes) -> Iterator[Waiter]:
        waiter = Waiter(channel)
        with self._lock:
            waiters = self._waiters.setdefault(channel, set())
            waiters.add(waiter)
            if len(waiters) == 1:
                self._send("SUBSCRIBE", channel)
            elif channel in self._confirmed:
                waiter.confirmed()
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(channel, set())
                waiters.discard(waiter)
                if not waiters:
                    self._waiters.pop(channel, None)
                    self._confirmed.discard(channel)
                    self._send("UNSUBSCRIBE", channel)

    def _send(self, *command: object) -> None:
        """Send on the listener connection (caller holds the lock). Without a connection
        the thread subscribes every channel when it reconnects."""
        connection = self._connection
        if connection is None:
            return
        # If it fails, the reading thread sees the broken connection and reconnects.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
            connection.send_command(*command, check_health=False)

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        delay = RECONNECT_FIRST
        failing_since: float | None = None
        while not self._closed.is_set():
            try:
                self._listen()
                delay = RECONNECT_FIRST
            except Exception as exc:
                if self._closed.is_set():
                    break
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning(
                        "Result listener lost Redis at %s (%s); reconnecting", self._where, exc
                    )
                self._closed.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            failing_since = None

    def _listen(self) -> None:
        connection = self._clients.dedicated()
        try:
            with self._lock:
                channels = list(self._waiters)
                if channels:
                    connection.send_command("SUBSCRIBE", *channels, check_health=False)
                self._connection = connection
            while not self._closed.is_set():
                if connection.can_read(IDLE_READ):
                    self._hear(connection.read_response())
        finally:
            with self._lock:
                self._connection = None
                self._confirmed.clear()
                for waiters in self._waiters.values():
                    for waiter in waiters:
                        waiter.lost()
            self._clients.give_back(connection)

    def _hear(self, message: object) -> None:
        if not isinstance(message, list) or len(message) < 3:
            return
        kind, channel = message[0], message[1]
        with self._lock:
            waiters = list(self._waiters.get(channel, ()))
            if kind == b"subscribe" and waiters:
                self._confirmed.add(channel)
                for waiter in waiters:
                    waiter.confirmed()
            elif kind == b"message":
                for waiter in waiters:
                    waiter.deliver(message[2])

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            connection = self._connection
        if connection is not None:
            connection.disconnect()  # ends a read in progress
        self._thread.join(timeout=IDLE_READ + 1)
