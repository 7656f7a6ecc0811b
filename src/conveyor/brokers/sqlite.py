"""The embedded broker: one SQLite file, shared by every worker process on the machine.

Every state change is one ``BEGIN IMMEDIATE`` transaction, so several processes can
produce and consume at once. A message row is *visible* when ``visible_at`` has passed:
publishing with a delay, leasing, extending and deferring all just set ``visible_at``, so a
lapsed lease needs no restore pass. A lease is a random token stored on the row; ack,
reject, extend and defer only touch the row while it still carries the caller's token, so
a consumer whose lease lapsed cannot ack away the lease someone else took since.

Fetch order is priority (9 first), then the time a message became visible, then id. The
index ``(queue, priority, visible_at)`` serves that with one seek per priority level, so a
fetch costs ``O(log n)`` however many messages are leased or delayed.

Exchanges and bindings live in the database, so every process routes alike; a process
caches them and re-reads them when the ``topology_version`` counter in ``meta`` moves.

A blocked ``fetch`` sleeps on a condition that publishes in this process ring, and between
rings checks ``PRAGMA data_version`` (which changes when any other connection commits)
every 1 ms, doubling to 50 ms while nothing changes; it also wakes when the earliest
delayed or leased message of its queues is due.

Each thread uses its own connection. A forked child opens its own and never touches the
ones it inherited (SQLite forbids carrying a connection across ``fork``).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

from conveyor.brokers.base import Broker, QueueStats
from conveyor.brokers.virtual import (
    MAX_PRIORITY,
    DeadLetter,
    Doorbell,
    Topology,
    TopologyChange,
    WakeRequests,
    binding_arguments_json,
    encode_json,
    new_lease_token,
    priority_of,
    unique_queue_names,
)
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import BrokerError, BrokerUnavailable, ConfigurationError
from conveyor.routing import Binding, Exchange, Queue

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('topology_version', 0)",
    """CREATE TABLE IF NOT EXISTS exchanges (name TEXT PRIMARY KEY, type TEXT NOT NULL,
        durable INTEGER NOT NULL, auto_delete INTEGER NOT NULL, arguments TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, arguments TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS bindings (exchange TEXT NOT NULL, queue TEXT NOT NULL,
        routing_key TEXT NOT NULL, arguments TEXT NOT NULL,
        PRIMARY KEY (exchange, queue, routing_key, arguments))""",
    # A row is visible once visible_at has passed; while leased, visible_at is the lease's
    # end and lease_token is set. Headers and properties are JSON; the body is never decoded.
    """CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL, priority INTEGER NOT NULL, visible_at REAL NOT NULL,
        lease_token TEXT, delivery_count INTEGER NOT NULL DEFAULT 0,
        exchange TEXT NOT NULL, routing_key TEXT NOT NULL, body BLOB NOT NULL,
        content_type TEXT NOT NULL, content_encoding TEXT NOT NULL,
        headers TEXT NOT NULL, properties TEXT NOT NULL, published_at REAL NOT NULL)""",
    # The rowid ends every index entry, so this orders by (visible_at, id) within a level.
    "CREATE INDEX IF NOT EXISTS messages_by_visibility ON messages (queue, priority, visible_at)",
    """CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id INTEGER NOT NULL, queue TEXT NOT NULL, priority INTEGER NOT NULL,
        delivery_count INTEGER NOT NULL, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
        body BLOB NOT NULL, content_type TEXT NOT NULL, content_encoding TEXT NOT NULL,
        headers TEXT NOT NULL, properties TEXT NOT NULL, published_at REAL NOT NULL,
        reason TEXT NOT NULL, dead_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, id)",
)

_ENVELOPE_COLUMNS = (
    "exchange, routing_key, body, content_type, content_encoding, headers, properties, published_at"
)
_INSERT_MESSAGE = (
    f"INSERT INTO messages (queue, priority, visible_at, {_ENVELOPE_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_VISIBLE = (
    "SELECT id, visible_at FROM messages WHERE queue = ? AND priority = ? AND visible_at <= ? "
    "ORDER BY visible_at, id LIMIT ?"
)
_EARLIEST = (
    "SELECT visible_at FROM messages WHERE queue = ? AND priority = ? ORDER BY visible_at LIMIT 1"
)
_LEASE = (
    "UPDATE messages SET visible_at = ?, lease_token = ?, delivery_count = delivery_count + 1 "
    "WHERE id = ?"
)
_DELIVERY_COLUMNS = (
    "id, queue, exchange, routing_key, delivery_count, lease_token, body, content_type, "
    "content_encoding, headers, properties"
)
_HELD = "id = ? AND lease_token = ?"
_DEAD_LETTER = f"""
    INSERT INTO dead_letters (message_id, queue, priority, delivery_count, {_ENVELOPE_COLUMNS},
                              reason, dead_at)
    SELECT id, queue, priority, delivery_count, {_ENVELOPE_COLUMNS}, ?, ?
    FROM messages WHERE {_HELD}"""
_STATS = """
    SELECT COALESCE(SUM(visible_at <= :now), 0),
           COALESCE(SUM(visible_at > :now AND lease_token IS NULL), 0),
           COALESCE(SUM(visible_at > :now AND lease_token IS NOT NULL), 0),
           (SELECT COUNT(*) FROM dead_letters WHERE queue = :queue)
    FROM messages WHERE queue = :queue"""

SYNCHRONOUS_MODES = frozenset({"off", "normal", "full", "extra"})

# ``busy_timeout`` already waits inside SQLite; these retries cover the SQLITE_BUSY that
# SQLite returns at once (WAL recovery, a snapshot that cannot be upgraded).
_RETRY_FIRST = 0.001
_RETRY_MAX = 0.1
_RETRY_FOR = 30.0
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

_POLL_FIRST = 0.001
_POLL_MAX = 0.05
# Far more ids than this in one ``IN (...)`` would meet SQLite's parameter limit.
_IDS_PER_QUERY = 500


def database_path(url: str) -> Path:
    """``sqlite:///relative.db`` (from the current directory) or ``sqlite:////abs.db``."""
    prefix = "sqlite://"
    rest = url[len(prefix) :].split("?", 1)[0] if url.startswith(prefix) else ""
    if not rest.startswith("/") or len(rest) < 2:
        raise ConfigurationError(
            f"not a SQLite broker URL: {url!r}; use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = unquote(rest[1:])
    if path == ":memory:":
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between threads and processes; "
            "use memory:// for an in-process broker"
        )
    return Path(os.path.abspath(path))


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


# Connections a forked child inherited: using or even closing them could disturb the
# parent's locks, so the child keeps them referenced (never finalized) and opens its own.
_INHERITED: list[sqlite3.Connection] = []


def _close_if_owner(connection: sqlite3.Connection, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        connection.close()
    else:
        _INHERITED.append(connection)


class _ThreadConnection:
    """One thread's connection; when the thread ends, its finalizer closes it."""

    __slots__ = ("__weakref__", "connection", "epoch")

    def __init__(self, connection: sqlite3.Connection, epoch: int) -> None:
        self.connection = connection
        self.epoch = epoch


_DOORBELLS: weakref.WeakValueDictionary[str, Doorbell] = weakref.WeakValueDictionary()
_DOORBELLS_LOCK = threading.Lock()


def _doorbell_for(path: Path) -> Doorbell:
    # Brokers on one file in one process share a doorbell, so a producer and a worker
    # built from separate apps still wake each other without polling.
    with _DOORBELLS_LOCK:
        doorbell = _DOORBELLS.get(str(path))
        if doorbell is None:
            doorbell = _DOORBELLS[str(path)] = Doorbell()
        return doorbell


def _forget_doorbells_in_child() -> None:
    global _DOORBELLS_LOCK
    _DOORBELLS_LOCK = threading.Lock()
    _DOORBELLS.clear()


os.register_at_fork(after_in_child=_forget_doorbells_in_child)


class SqliteBroker(Broker):
    """Queues in one SQLite file, durable and shared by the processes of one machine."""

    scheme = "sqlite"

    def __init__(
        self,
        url: str = "sqlite:///conveyor.db",
        *,
        visibility_timeout: float = 3600.0,
        busy_timeout: float = 5.0,
        synchronous: str = "normal",
    ) -> None:
        super().__init__(url, visibility_timeout=visibility_timeout)
        if synchronous.lower() not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        self.path = database_path(url)
        self.busy_timeout = busy_timeout
        # NORMAL survives any crash of the application; only a power loss can drop the
        # last commits. FULL fsyncs every commit.
        self.synchronous = synchronous.upper()
        self._topology_cache: tuple[int, Topology] | None = None
        self._known_queues: set[str] = set()
        self._schema_ready = False
        self._start_process_state()

    def _start_process_state(self) -> None:
        """State that belongs to one process; rebuilt in a forked child."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._epoch = 0  # close() bumps it; connections of older epochs are closed
        self._finalizers: set[weakref.finalize[Any, Any]] = set()
        self._doorbell = _doorbell_for(self.path)
        self._wake_requests = WakeRequests(self._doorbell)

    # -- connections and transactions -----------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            self._start_process_state()
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is not None and holder.epoch == self._epoch:
            return holder.connection
        connection = self._open()
        with self._lock:
            holder = _ThreadConnection(connection, self._epoch)
            self._finalizers = {f for f in self._finalizers if f.alive}
            self._finalizers.add(weakref.finalize(holder, _close_if_owner, connection, self._pid))
        self._local.holder = holder
        if not self._schema_ready:
            self._transaction(connection, "BEGIN IMMEDIATE", self._create_schema)
            self._schema_ready = True
        return connection

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # transactions are begun explicitly
                check_same_thread=False,  # only its thread uses it; close() may run elsewhere
            )
        except (OSError, sqlite3.Error) as exc:
            raise BrokerUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
        try:
            self._retry_busy(lambda: connection.execute("PRAGMA journal_mode = WAL"))
            connection.execute(f"PRAGMA synchronous = {self.synchronous}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path} was written by a newer Conveyor (schema {version}); upgrade"
            )
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _retry_busy(self, attempt: Callable[[], T]) -> T:
        pause = _RETRY_FIRST
        give_up_at = time.monotonic() + _RETRY_FOR
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise BrokerError(f"SQLite error on {self.path}: {exc}") from exc
                if time.monotonic() >= give_up_at:
                    raise BrokerUnavailable(
                        f"{self.path} stayed locked for {_RETRY_FOR:.0f}s: {exc}"
                    ) from exc
            except sqlite3.Error as exc:
                raise BrokerError(f"SQLite error on {self.path}: {exc}") from exc
            time.sleep(pause * random.uniform(0.5, 1.0))  # jitter: contenders spread out
            pause = min(pause * 2, _RETRY_MAX)

    def _transaction(
        self, connection: sqlite3.Connection, begin: str, work: Callable[[sqlite3.Connection], T]
    ) -> T:
        def attempt() -> T:
            connection.execute(begin)
            try:
                result = work(connection)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            return result

        return self._retry_busy(attempt)

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return self._transaction(self._connection(), "BEGIN IMMEDIATE", work)

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return self._transaction(self._connection(), "BEGIN", work)

    def _data_version(self) -> int:
        connection = self._connection()
        row = self._retry_busy(lambda: connection.execute("PRAGMA data_version").fetchone())
        return int(row[0])

    # -- topology -------------------------------------------------------------------------
    def _topology(self, connection: sqlite3.Connection) -> Topology:
        """The topology as committed, re-read only when another declaration changed it."""
        (version,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'topology_version'"
        ).fetchone()
        cached = self._topology_cache
        if cached is not None and cached[0] == version:
            return cached[1]
        topology = Topology()
        topology.exchange_types.update(connection.execute("SELECT name, type FROM exchanges"))
        rows = connection.execute(
            "SELECT exchange, queue, routing_key, arguments FROM bindings ORDER BY rowid"
        )
        bindings = tuple(Binding(e, q, key, json.loads(args)) for e, q, key, args in rows)
        topology.apply(TopologyChange(bindings=bindings))
        self._topology_cache = (version, topology)
        return topology

    def _declare(self, plan: Callable[[Topology], TopologyChange], queue: Queue | None) -> None:
        def work(connection: sqlite3.Connection) -> None:
            change = plan(self._topology(connection))
            if queue is not None:
                arguments = encode_json(queue.declared_arguments(), "queue arguments")
                connection.execute(
                    "INSERT OR IGNORE INTO queues (name, arguments) VALUES (?, ?)",
                    (queue.name, arguments),
                )
            if not change:
                return
            exchanges = [
                (e.name, e.type, e.durable, e.auto_delete, encode_json(e.arguments, "arguments"))
                for e in change.exchanges
            ]
            bindings = [
                (b.exchange, b.queue, b.routing_key, binding_arguments_json(b))
                for b in change.bindings
            ]
            connection.executemany(
                "INSERT OR IGNORE INTO exchanges VALUES (?, ?, ?, ?, ?)", exchanges
            )
            connection.executemany(
                "INSERT OR IGNORE INTO queues (name, arguments) VALUES (?, '{}')",
                [(b.queue,) for b in change.bindings],
            )
            connection.executemany("INSERT OR IGNORE INTO bindings VALUES (?, ?, ?, ?)", bindings)
            connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'topology_version'")

        self._write(work)

    def declare_exchange(self, exchange: Exchange) -> None:
        self._declare(lambda topology: topology.plan_exchange(exchange), None)

    def declare_queue(self, queue: Queue) -> None:
        self._declare(lambda topology: topology.plan_queue(queue), queue)

    def bind(self, binding: Binding) -> None:
        self._declare(lambda topology: topology.plan_binding(binding), None)

    # -- producing ------------------------------------------------------------------------
    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        self.publish_many([(envelope, exchange, routing_key)], delay=delay)

    def publish_many(
        self, items: Sequence[tuple[Envelope, str, str]], *, delay: float | None = None
    ) -> None:
        # Encode before taking the write lock; a bad header fails the batch early.
        encoded = [
            (
                envelope,
                exchange,
                routing_key,
                priority_of(envelope),
                encode_json(envelope.headers, "message headers"),
                encode_json(envelope.properties, "message properties"),
            )
            for envelope, exchange, routing_key in items
        ]
        new_queues: set[str] = set()

        def work(connection: sqlite3.Connection) -> int:
            topology = self._topology(connection)
            now = time.time()
            visible_at = now + delay if delay is not None and delay > 0 else now
            rows = []
            for envelope, exchange, key, priority, headers, properties in encoded:
                for queue in topology.destinations(exchange, key, envelope.headers):
                    if queue not in self._known_queues:
                        new_queues.add(queue)
                    rows.append((
                        queue, priority, visible_at, exchange, key, envelope.body,
                        envelope.content_type, envelope.content_encoding, headers, properties,
                        now,
                    ))  # fmt: skip
            connection.executemany(
                "INSERT OR IGNORE INTO queues (name, arguments) VALUES (?, '{}')",
                [(name,) for name in new_queues],
            )
            connection.executemany(_INSERT_MESSAGE, rows)
            return len(rows)

        published = self._write(work) if encoded else 0
        self._known_queues.update(new_queues)
        if published:
            self._doorbell.ring()

    # -- consuming ------------------------------------------------------------------------
    def fetch(self, queues: Sequence[str], max_messages: int, timeout: float) -> list[Delivery]:
        names = unique_queue_names(queues, max_messages)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._doorbell.condition:
            wake_mark = self._wake_requests.mark()
        try_lease = True
        while True:
            # Taken before looking, so a change made while we look is noticed after.
            rings, version = self._doorbell.rings, self._data_version()
            if try_lease:
                deliveries = self._write(lambda c: self._lease(c, names, max_messages))
                if deliveries:
                    return deliveries
                if time.monotonic() >= deadline:
                    return []
            earliest = self._read(lambda c: self._earliest_visible_at(c, names))
            if earliest is not None and earliest <= time.time():
                try_lease = True  # just became visible, or another consumer won a race
                continue
            if not self._sleep_until_change(rings, version, wake_mark, deadline, earliest):
                return []
            # An idle consumer looks with a read before it takes the write lock.
            try_lease = False

    def _sleep_until_change(
        self, rings: int, version: int, wake_mark: int, deadline: float, due: float | None
    ) -> bool:
        """Wait for a publish, a commit elsewhere or ``due``; False on wake() or timeout."""
        condition = self._doorbell.condition
        poll = _POLL_FIRST
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pause = min(poll, remaining)
            if due is not None:
                pause = min(pause, max(0.0, due - time.time()))
            with condition:
                if self._wake_requests.consume(wake_mark):
                    return False
                if self._doorbell.rings == rings:
                    condition.wait(pause)
                    if self._wake_requests.consume(wake_mark):
                        return False
                if self._doorbell.rings != rings:
                    return True
            if self._data_version() != version:
                return True
            if due is not None and time.time() >= due:
                return True
            poll = min(poll * 2, _POLL_MAX)

    def _lease(
        self, connection: sqlite3.Connection, names: Sequence[str], max_messages: int
    ) -> list[Delivery]:
        now = time.time()
        chosen: list[int] = []
        for priority in range(MAX_PRIORITY, -1, -1):
            wanted = max_messages - len(chosen)
            found: list[tuple[int, float]] = []
            for name in names:
                found += connection.execute(_VISIBLE, (name, priority, now, wanted)).fetchall()
            found.sort(key=lambda row: (row[1], row[0]))
            chosen += [message_id for message_id, _ in found[:wanted]]
            if len(chosen) == max_messages:
                break
        if not chosen:
            return []
        lease_until = now + self.visibility_timeout
        connection.executemany(
            _LEASE, [(lease_until, new_lease_token(), message_id) for message_id in chosen]
        )
        rows: dict[int, tuple[Any, ...]] = {}
        for start in range(0, len(chosen), _IDS_PER_QUERY):
            batch = chosen[start : start + _IDS_PER_QUERY]
            marks = ",".join("?" * len(batch))
            query = f"SELECT {_DELIVERY_COLUMNS} FROM messages WHERE id IN ({marks})"
            rows.update((row[0], row) for row in connection.execute(query, batch))
        return [_delivery(rows[message_id]) for message_id in chosen]

    def _earliest_visible_at(
        self, connection: sqlite3.Connection, names: Sequence[str]
    ) -> float | None:
        times = [
            row[0]
            for name in names
            for priority in range(MAX_PRIORITY + 1)
            if (row := connection.execute(_EARLIEST, (name, priority)).fetchone()) is not None
        ]
        return min(times, default=None)

    def ack(self, delivery: Delivery) -> None:
        self.ack_many([delivery])

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        held = [_held(delivery) for delivery in deliveries]
        if held:
            self._write(lambda c: c.executemany(f"DELETE FROM messages WHERE {_HELD}", held))

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        held = _held(delivery)

        def work(connection: sqlite3.Connection) -> int:
            now = time.time()
            if requeue:
                return connection.execute(
                    f"UPDATE messages SET visible_at = ?, lease_token = NULL WHERE {_HELD}",
                    (now, *held),
                ).rowcount
            connection.execute(_DEAD_LETTER, (reason, now, *held))
            return connection.execute(f"DELETE FROM messages WHERE {_HELD}", held).rowcount

        if self._write(work) and requeue:
            self._doorbell.ring()

    def extend(self, deliveries: Sequence[Delivery], seconds: float | None = None) -> None:
        lease_for = self.visibility_timeout if seconds is None else seconds
        held = [_held(delivery) for delivery in deliveries]
        if not held:
            return

        def work(connection: sqlite3.Connection) -> None:
            until = time.time() + lease_for
            connection.executemany(
                f"UPDATE messages SET visible_at = ? WHERE {_HELD}",
                [(until, *lease) for lease in held],
            )

        self._write(work)

    def defer(self, delivery: Delivery, until: float) -> None:
        # One UPDATE: the message is never both gone and not yet back. Handing back an
        # early eta is not a failed delivery, so the count is given back too.
        changed = self._write(
            lambda c: (
                c.execute(
                    "UPDATE messages SET visible_at = ?, lease_token = NULL, "
                    f"delivery_count = delivery_count - 1 WHERE {_HELD}",
                    (until, *_held(delivery)),
                ).rowcount
            )
        )
        if changed:
            self._doorbell.ring()

    # -- administration -------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        def work(connection: sqlite3.Connection) -> int:
            return connection.execute(
                "DELETE FROM messages WHERE queue = ? AND (lease_token IS NULL OR visible_at <= ?)",
                (queue, time.time()),
            ).rowcount

        return self._write(work)

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        def work(connection: sqlite3.Connection) -> list[QueueStats]:
            names = (
                [name for (name,) in connection.execute("SELECT name FROM queues ORDER BY name")]
                if queues is None
                else list(queues)
            )
            now = time.time()
            result = []
            for name in names:
                ready, delayed, leased, dead = connection.execute(
                    _STATS, {"now": now, "queue": name}
                ).fetchone()
                result.append(QueueStats(name, ready, delayed, leased, dead))
            return result

        return self._read(work)

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` messages rejected without requeue from ``queue``."""
        query = (
            "SELECT body, content_type, content_encoding, headers, properties, queue, "
            "exchange, routing_key, delivery_count, reason, dead_at FROM dead_letters "
            "WHERE queue = ? ORDER BY id LIMIT ?"
        )
        rows = self._read(lambda c: c.execute(query, (queue, limit)).fetchall())
        return [
            DeadLetter(
                Envelope(bytes(body), ctype, encoding, json.loads(headers), json.loads(props)),
                *rest,
            )
            for body, ctype, encoding, headers, props, *rest in rows
        ]

    def check(self) -> None:
        try:
            self._read(lambda c: c.execute("SELECT 1").fetchone())
        except BrokerError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    def wake(self) -> None:
        self._wake_requests.request()

    def close(self) -> None:
        """Close every connection this broker opened in this process.

        The broker stays usable: a later call opens a new connection (so a straggling ack
        during shutdown is not lost), which the next ``close`` closes again.
        """
        self.wake()
        with self._lock:
            self._epoch += 1
            finalizers, self._finalizers = self._finalizers, set()
        for finalizer in finalizers:
            finalizer()


def _held(delivery: Delivery) -> tuple[int, str]:
    if not isinstance(delivery.broker_data, int):
        raise BrokerError(f"delivery {delivery.tag!r} was not issued by a SQLite broker")
    return delivery.broker_data, delivery.tag


def _delivery(row: tuple[Any, ...]) -> Delivery:
    (message_id, queue, exchange, routing_key, count, token, body, content_type,
     content_encoding, headers, properties) = row  # fmt: skip
    envelope = Envelope(
        bytes(body), content_type, content_encoding, json.loads(headers), json.loads(properties)
    )
    return Delivery(
        envelope=envelope,
        queue=queue,
        tag=token,
        exchange=exchange,
        routing_key=routing_key,
        redelivered=count > 1,
        delivery_count=count,
        broker_data=message_id,
    )
