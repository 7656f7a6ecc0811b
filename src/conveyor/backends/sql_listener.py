"""PostgreSQL LISTEN for the SQL result backend: one connection per backend wakes its waiters.

Stores of a ready state send ``NOTIFY <channel>, '<task id>'`` in their own transaction
(``sql.SqlBackend``); this module holds the other end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Engine

logger = logging.getLogger("conveyor.backends.sql")

KEEPALIVE = 30.0
"""Seconds of silence after which the connection is checked (a dead peer sends nothing)."""
RETRY_FIRST = 0.01
RETRY_MAX = 5.0


class Listener:
    """One PostgreSQL LISTEN connection per backend, shared by all of its waiters.

    A thread blocks on the connection's socket and a wake-up pipe (so ``stop`` is
    immediate) and sets the event of every waiter for a notified task id. While it is
    not listening (starting, or reconnecting after the database went away), waiters poll
    at the normal pace; each time LISTEN takes effect every waiter is woken to look again,
    so nothing stored before that is missed.
    """

    def __init__(self, engine: Engine, channel: str) -> None:
        self._engine = engine
        self._channel = channel
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake_r = self._wake_w = -1
        self.listening = False

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(event)
            if self._thread is None and not self._stopping:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-sql-listener", daemon=True
                )
                self._thread.start()
        try:
            yield event
        finally:
            with self._lock:
                waiting = self._waiters.get(task_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[task_id]

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        os.write(self._wake_w, b"x")
        thread.join(RETRY_MAX + 5)
        if thread.is_alive():
            return  # stuck in a database call: it ends once that returns, seeing _stopping
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._stopping = False  # a backend used again after close listens again

    def _wake(self, task_id: str | None) -> None:
        with self._lock:
            if task_id is None:
                events = [event for waiting in self._waiters.values() for event in waiting]
            else:
                events = list(self._waiters.get(task_id, ()))
        for event in events:
            event.set()

    def _pause(self, seconds: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            selector.select(seconds)

    def _drain_wake_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stopping:
            try:
                self._listen()
                delay = RETRY_FIRST
            except Exception as exc:  # the database went away: retry
                self.listening = False
                self._wake(None)
                logger.warning(
                    "LISTEN on %s failed (%s); retrying in %.2fs", self._channel, exc, delay
                )
                self._pause(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _listen(self) -> None:
        pooled = self._engine.raw_connection()
        connection: Any = pooled.driver_connection  # a psycopg.Connection
        pooled.detach()  # ours for as long as we listen; closing it closes the socket
        try:
            connection.rollback()  # the pool's liveness ping may have opened a transaction
            connection.autocommit = True
            connection.execute(f'LISTEN "{self._channel}"')
            self.listening = True
            self._wake(None)
            with selectors.DefaultSelector() as selector:
                selector.register(connection.fileno(), selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    if not selector.select(KEEPALIVE):
                        connection.execute("SELECT 1")  # notice a silently dead connection
                    self._drain_wake_pipe()
                    for notify in connection.notifies(timeout=0):
                        self._wake(notify.payload)
        finally:
            self.listening = False
            pooled.close()
