"""How an idle Redis fetch learns, without polling, that it should look again.

Redis can block a client on several lists only by popping from them (BRPOP, BLMPOP),
and a message popped into a client that dies before recording it is lost. So the fetch
never blocks inside Redis: it takes messages with a Lua script that pops and records in
one step, and while there is nothing to take it sleeps on a pub/sub connection that
Redis's *client-side caching* invalidations wake:

* a second connection runs ``CLIENT TRACKING ON REDIRECT <listener> BCAST PREFIX <queue>``
  while the fetch is idle, so Redis sends the listener the name of every key under those
  prefixes that anyone changes: an LPUSH by a Celery producer as much as by ours. It is
  standard Redis (6.0+), needs no server configuration, and pops nothing;
* the listener also receives fanout messages (PSUBSCRIBE, kombu's channels);
* ``wake()`` writes to a pipe the listener's ``select`` also watches, so it works from a
  signal handler and while Redis is down.

Tracking is switched off when a fetch leaves messages behind (or fetches keep finding
some), so a busy worker is not sent a notice per push it would only read later. A server
that refuses ``CLIENT TRACKING`` (some hosted Redis disable ``CLIENT``) is polled every
``polling_interval`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
from conveyor.brokers.idle_gate import IdleGate
from conveyor.redis_connection import RawConnection, RedisClients

logger = logging.getLogger("conveyor.brokers.redis")

INVALIDATE_CHANNEL = b"__redis__:invalidate"
FETCHES_BEFORE_QUIET = 8
"""Fetches in a row that find messages, each taking the last, after which change reports
stop until the next sleep."""
KEEP_WATCH = 0.001
"""Seconds a process that emptied the queue keeps the idle gate while it runs what it
took. A sibling that took over at once would wake, look (a fetch script) and start
listening while the task and its caller need the cores: with two processes on two cores,
the harness's round trip went from 0.92-1.07 to 0.75-0.83 ms (3 alternating pairs) and
the worker's CPU per round trip from 710-830 to 500-530 us. A message that arrives
meanwhile waits about this long for a sibling (see :class:`~conveyor.worker.alarm.JobAlarm`).

Whether the queue is empty, the fetch script says. With a window of one message
(``--prefetch-multiplier 1``) every batch is full, and the round trip there went from
1.02-1.08 to 0.77 ms when a full batch stopped counting as a busy queue."""


def minimal_prefixes(names: Iterable[str]) -> tuple[str, ...]:
    """Drop every name that another name is a prefix of: Redis refuses overlapping
    tracking prefixes, and the shorter one already covers the longer."""
    kept: list[str] = []
    for name in sorted(set(names)):
        if not any(name.startswith(shorter) for shorter in kept):
            kept.append(name)
    return tuple(kept)


@dataclass
class Heard:
    """What the listener heard while waiting."""

    woken: bool = False
    changed: bool = False
    fanout: list[tuple[bytes, bytes]] = field(default_factory=list)  # (pattern, payload)


class WakePipe:
    """A self-pipe: ``wake()`` may be called from any thread or a signal handler."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def ring(self) -> None:
        # A full pipe already holds a pending wake; a closed one means shutting down.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.write_fd, b"!")

    def drain(self) -> bool:
        rang = False
        try:
            while os.read(self.read_fd, 512):
                rang = True
        except (BlockingIOError, OSError):
            pass
        return rang

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class ChangeListener:
    """The listener and tracker connections of one broker; one fetch thread at a time."""

    def __init__(self, clients: RedisClients) -> None:
        self._clients = clients
        self._listener: RawConnection | None = None
        self._tracker: RawConnection | None = None
        self._patterns: set[str] = set()
        self._tracked: tuple[str, ...] | None = None
        self._tracker_replies = 0
        self._listener_id = 0
        self.tracking_supported = True

    # -- connections -----------------------------------------------------------------
    def _open(self) -> RawConnection:
        if self._listener is not None:
            return self._listener
        listener = self._clients.dedicated()
        try:
            if self.tracking_supported:
                listener.send_command("CLIENT", "ID", check_health=False)
                try:
                    self._listener_id = int(listener.read_response())
                except redis.ResponseError as exc:
                    self._refuse_tracking(exc)
            listener.send_command("SUBSCRIBE", INVALIDATE_CHANNEL, check_health=False)
            listener.read_response()
        except BaseException:
            self._clients.give_back(listener)
            raise
        self._listener = listener
        self._patterns = set()
        self._tracked = None
        return listener

    def _tracker_connection(self) -> RawConnection:
        if self._tracker is None:
            self._tracker = self._clients.dedicated()
            self._tracker_replies = 0
        tracker = self._tracker
        while self._tracker_replies:  # replies of commands sent without waiting
            self._tracker_replies -= 1
            tracker.read_response()
        return tracker

    def close(self) -> None:
        for connection in (self._listener, self._tracker):
            if connection is not None:
                with contextlib.suppress(redis.RedisError):
                    self._clients.give_back(connection)
        self._listener = self._tracker = None
        self._tracked = None
        self._patterns = set()

    # -- what to listen to ---------------------------------------------------------------
    def subscribe_fanout(self, patterns: Iterable[str]) -> None:
        listener = self._open()
        new = sorted(set(patterns) - self._patterns)
        if new:
            # The confirmations are read (and skipped) with the messages.
            listener.send_command("PSUBSCRIBE", *new, check_health=False)
            self._patterns.update(new)

    def track(self, prefixes: tuple[str, ...]) -> bool:
        """Make sure Redis reports changes under ``prefixes``; True if this call turned
        tracking on (the caller then looks once more before sleeping)."""
        if not self.tracking_supported or self._tracked == prefixes:
            return False
        self._open()
        if self._tracking_refused():  # found out while opening
            return False
        listener_id = self._listener_id
        tracker = self._tracker_connection()
        try:
            if self._tracked is not None:
                tracker.send_command("CLIENT", "TRACKING", "OFF", check_health=False)
                tracker.read_response()
            args: list[object] = ["CLIENT", "TRACKING", "ON", "REDIRECT", listener_id, "BCAST"]
            for prefix in prefixes:
                args += ["PREFIX", prefix]
            tracker.send_command(*args, check_health=False)
            tracker.read_response()
        except redis.ResponseError as exc:
            self._refuse_tracking(exc)
            return False
        self._tracked = prefixes
        return True

    def _tracking_refused(self) -> bool:
        return not self.tracking_supported

    def _refuse_tracking(self, exc: Exception) -> None:
        self.tracking_supported = False
        logger.warning(
            "Redis refused client tracking (%s): idle fetches will poll instead of being "
            "woken by pushes",
            exc,
        )

    def untrack(self) -> None:
        """Stop change reports (the fetch is busy). The reply is read later, so this
        costs the fetch no round trip."""
        if self._tracked is None or self._tracker is None:
            return
        self._tracker.send_command("CLIENT", "TRACKING", "OFF", check_health=False)
        self._tracker_replies += 1
        self._tracked = None

    @property
    def tracking(self) -> bool:
        return self._tracked is not None

    # -- waiting ---------------------------------------------------------------------
    def wait(self, timeout: float, watched: frozenset[bytes], pipe: WakePipe | None) -> Heard:
        """Sleep until a watched key changes, a fanout message or a wake arrives, or
        ``timeout`` passes. ``timeout=0`` only collects what already arrived; without a
        ``pipe``, wakes are left for the next wait that has one."""
        listener = self._open()
        heard = Heard()
        wait_for = max(0.0, timeout)
        while True:
            while listener.can_read(0):
                self._hear(listener.read_response(), watched, heard)
            if pipe is not None and pipe.drain():
                heard.woken = True
            if heard.woken or heard.changed or heard.fanout or wait_for <= 0:
                return heard
            sock = getattr(listener, "_sock", None)
            if sock is None:
                raise redis.ConnectionError("the listener connection is closed")
            watching = [sock] if pipe is None else [sock, pipe.read_fd]
            readable, _, _ = select.select(watching, [], [], wait_for)
            wait_for = 0.0  # after one sleep, only collect what woke us
            if not readable:
                return heard

    @staticmethod
    def _hear(message: object, watched: frozenset[bytes], heard: Heard) -> None:
        if not isinstance(message, list) or not message:
            return
        kind = message[0]
        if kind == b"message" and len(message) == 3 and message[1] == INVALIDATE_CHANNEL:
            keys = message[2]
            # None: the whole database was flushed.
            if keys is None or any(key in watched for key in keys):
                heard.changed = True
        elif kind == b"pmessage" and len(message) == 4:
            heard.fanout.append((message[1], message[3]))


class IdleWaiter:
    """The fetch side of waking, for one broker object in one process.

    Holds the listener (used by one fetching thread at a time; another thread that would
    sleep meanwhile waits briefly on the wake pipe instead), the wake pipe, and what
    Celery published to the fanout queues being fetched. Connection failures here are
    never raised: a listener left over from before a restart or a dropped connection is
    reopened on the next call, and a real outage shows in the next fetch command.
    """

    def __init__(self, clients: RedisClients, polling_interval: float) -> None:
        self.listener = ChangeListener(clients)
        self.pipe = WakePipe()
        self.polling_interval = polling_interval
        self._lock = threading.Lock()
        self._fetches_awake = 0  # fetches that found messages since the last sleep
        self.gate: IdleGate | None = None
        """Shared with the other processes of a prefork worker: one listens at a time."""
        self.kept_until: float | None = None
        """While this process keeps the gate between a fetch and its next look, when
        (monotonic) it must let a sibling take over."""

    def sleep(
        self, watched: frozenset[bytes], prefixes: tuple[str, ...], timeout: float
    ) -> list[tuple[bytes, bytes]]:
        """Wait at most ``timeout`` for a change worth another look; returns the fanout
        messages heard. Raises only a refusal of Redis (``ResponseError``)."""
        if not self._lock.acquire(blocking=False):
            self.pipe_wait(min(timeout, 0.05))
            return []
        self._fetches_awake = 0
        self.kept_until = None  # back at the watch it kept
        try:
            listener = self.listener
            try:
                gate = self.gate
                if gate is not None and not gate.held:
                    if not gate.acquire(timeout, self.pipe.read_fd):
                        # Read the ring that ended the wait (the fetch knows whether it
                        # was meant for it); left in the pipe, it would end every wait.
                        self.pipe.drain()
                        return []
                    # Changes heard while a sibling listened are older than the look the
                    # caller takes next; only fanout messages are worth keeping.
                    return listener.wait(0, watched, None).fanout if listener.tracking else []
                if listener.track(prefixes):
                    return []  # look once more: a push may have landed meanwhile
                if not listener.tracking_supported:
                    timeout = min(timeout, self.polling_interval)
                return listener.wait(timeout, watched, self.pipe).fanout
            except _CONNECTION_ERRORS:
                listener.close()
                self.pipe_wait(min(timeout, self.polling_interval))
                return []
            except BaseException:
                listener.close()
                raise
        finally:
            self._lock.release()

    def collect(self, patterns: set[str], watched: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
        """Subscribe to these fanout patterns and return what arrived, without waiting."""
        if not self._lock.acquire(blocking=False):
            return []
        try:
            try:
                self.listener.subscribe_fanout(patterns)
                return self.listener.wait(0, watched, None).fanout
            except _CONNECTION_ERRORS:
                self.listener.close()
                return []
        finally:
            self._lock.release()

    def quiet(self, busy: bool) -> None:
        """The fetch got messages. If the queue is ``busy`` (the fetch script saw more
        in its lists), let a sibling listen at once and stop the change reports until
        this fetch is idle again. If it took the last ones, this process keeps the gate
        for up to :data:`KEEP_WATCH` while it runs what it took, since it will look
        again right after (see :meth:`hand_over`), and the reports stay on: turning
        them back on would cost a round trip. Unless fetches keep finding messages:
        then no sleep reads the reports, and they would pile up in Redis's buffer for
        this client."""
        gate = self.gate
        if gate is not None and gate.held:
            if busy:
                self.hand_over()
            else:
                self.kept_until = time.monotonic() + KEEP_WATCH
        self._fetches_awake += 1
        busy = busy or self._fetches_awake > FETCHES_BEFORE_QUIET
        if busy and self.listener.tracking and self._lock.acquire(blocking=False):
            try:
                self.listener.untrack()
            except (redis.RedisError, OSError):
                self.listener.close()
            finally:
                self._lock.release()

    def hand_over(self) -> None:
        """Let a sibling take over the watch this process kept. Safe in a signal
        handler of the fetching thread: it only lets go of a lock and rings a FIFO."""
        self.kept_until = None
        if self.gate is not None:
            self.gate.release()

    def forget(self) -> None:
        """Drop the connections (their server went away); reopened when next needed."""
        self.hand_over()  # a sibling may find the server back first
        if self._lock.acquire(blocking=False):
            try:
                self.listener.close()
            finally:
                self._lock.release()

    def pipe_wait(self, timeout: float) -> None:
        select.select([self.pipe.read_fd], [], [], max(0.0, timeout))

    def close(self) -> None:
        """Close the connections; the caller has rung the pipe, so a sleep ends soon."""
        with self._lock:
            self.listener.close()
            self.hand_over()


_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
