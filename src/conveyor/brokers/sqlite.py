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

A blocked ``fetch`` sleeps until publishes in this process ring, until another
connection commits (``PRAGMA data_version`` moves; polled every 1 ms, doubling to 50 ms
while nothing changes) or until the earliest delayed or leased message of its queues is
due. Connections, retries and that waiting are :mod:`conveyor.sqlite_store`'s.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from conveyor.brokers.base import Broker, QueueStats
from conveyor.brokers.virtual import (
    MAX_PRIORITY,
    DeadLetter,
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
from conveyor.sqlite_store import SqliteStore, database_path

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

# Far more ids than this in one ``IN (...)`` would meet SQLite's parameter limit.
_IDS_PER_QUERY = 500


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
        self._store = SqliteStore(
            database_path(url),
            setup=self._create_schema,
            error=BrokerError,
            unavailable=BrokerUnavailable,
            doorbell="messages",
            busy_timeout=busy_timeout,
            synchronous=synchronous,
        )
        self.path = self._store.path
        self._topology_cache: tuple[int, Topology] | None = None
        self._known_queues: set[str] = set()
        self._wake_requests = WakeRequests(self._store.doorbell)

    @property
    def busy_timeout(self) -> float:
        """Seconds SQLite waits for a lock; applies to connections opened from then on."""
        return self._store.busy_timeout

    @busy_timeout.setter
    def busy_timeout(self, seconds: float) -> None:
        self._store.busy_timeout = seconds

    @property
    def synchronous(self) -> str:
        """SQLite's ``synchronous`` mode, upper case (``NORMAL`` unless asked otherwise)."""
        return self._store.synchronous

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

        self._store.write(work)

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

        published = self._store.write(work) if encoded else 0
        self._known_queues.update(new_queues)
        if published:
            self._store.doorbell.ring()

    # -- consuming ------------------------------------------------------------------------
    def fetch(self, queues: Sequence[str], max_messages: int, timeout: float) -> list[Delivery]:
        names = unique_queue_names(queues, max_messages)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._store.doorbell.condition:
            wake_mark = self._wake_requests.mark()

        def woken() -> bool:
            return self._wake_requests.consume(wake_mark)

        try_lease = True
        while True:
            # Taken before looking, so a change made while we look is noticed after.
            seen = self._store.mark()
            if try_lease:
                deliveries = self._store.write(lambda c: self._lease(c, names, max_messages))
                if deliveries:
                    return deliveries
                if time.monotonic() >= deadline:
                    return []
            earliest = self._store.read(lambda c: self._earliest_visible_at(c, names))
            if earliest is not None and earliest <= time.time():
                try_lease = True  # just became visible, or another consumer won a race
                continue
            if not self._store.wait_for_change(seen, deadline, due=earliest, interrupted=woken):
                return []
            # An idle consumer looks with a read before it takes the write lock.
            try_lease = False

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
            self._store.write(lambda c: c.executemany(f"DELETE FROM messages WHERE {_HELD}", held))

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

        if self._store.write(work) and requeue:
            self._store.doorbell.ring()

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

        self._store.write(work)

    def defer(self, delivery: Delivery, until: float) -> None:
        # One UPDATE: the message is never both gone and not yet back. Handing back an
        # early eta is not a failed delivery, so the count is given back too.
        changed = self._store.write(
            lambda c: (
                c.execute(
                    "UPDATE messages SET visible_at = ?, lease_token = NULL, "
                    f"delivery_count = delivery_count - 1 WHERE {_HELD}",
                    (until, *_held(delivery)),
                ).rowcount
            )
        )
        if changed:
            self._store.doorbell.ring()

    # -- administration -------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        def work(connection: sqlite3.Connection) -> int:
            return connection.execute(
                "DELETE FROM messages WHERE queue = ? AND (lease_token IS NULL OR visible_at <= ?)",
                (queue, time.time()),
            ).rowcount

        return self._store.write(work)

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

        return self._store.read(work)

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` messages rejected without requeue from ``queue``."""
        query = (
            "SELECT body, content_type, content_encoding, headers, properties, queue, "
            "exchange, routing_key, delivery_count, reason, dead_at FROM dead_letters "
            "WHERE queue = ? ORDER BY id LIMIT ?"
        )
        rows = self._store.read(lambda c: c.execute(query, (queue, limit)).fetchall())
        return [
            DeadLetter(
                Envelope(bytes(body), ctype, encoding, json.loads(headers), json.loads(props)),
                *rest,
            )
            for body, ctype, encoding, headers, props, *rest in rows
        ]

    def check(self) -> None:
        self._store.check()

    def wake(self) -> None:
        self._wake_requests.request()

    def close(self) -> None:
        """Close every connection this broker opened in this process.

        The broker stays usable: a later call opens a new connection (so a straggling ack
        during shutdown is not lost), which the next ``close`` closes again.
        """
        self.wake()
        self._store.close()


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
