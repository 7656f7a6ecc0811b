"""The embedded result backend: one SQLite file, shared by every process on the machine.

The file is often the same one the SQLite broker uses; results live in their own
``conveyor_results`` table (and chord counters in ``conveyor_counters``) so both fit
in one database. Each row holds the encoded
result document plus the few columns the backend itself needs to query (status and
expiry), so the document keeps Celery's exact shape and serializer.

``wait`` learns about results stored by this process through a condition variable and
about results stored by other processes by polling ``PRAGMA data_version``, which
changes only when another connection commits, so an idle wait costs one pragma per
interval (0.5 ms growing to 50 ms).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from conveyor import states
from conveyor.backends.base import POLL_FIRST, POLL_MAX, Meta, ResultBackend
from conveyor.errors import BackendError, BackendUnavailable, ConfigurationError, TimeoutError

T = TypeVar("T")

TABLE = "conveyor_results"
COUNTERS = "conveyor_counters"

_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        task_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        document BLOB NOT NULL,
        content_type TEXT NOT NULL,
        content_encoding TEXT NOT NULL,
        date_done TEXT,
        expires_at REAL
    ) WITHOUT ROWID""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expires_at ON {TABLE} (expires_at)"
    " WHERE expires_at IS NOT NULL",
    f"""CREATE TABLE IF NOT EXISTS {COUNTERS} (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL,
        expires_at REAL
    ) WITHOUT ROWID""",
)

_LIVE = "(expires_at IS NULL OR expires_at > :now)"

# A stored SUCCESS is final unless it has expired (an expired row reads as missing).
_STORE = f"""
INSERT INTO {TABLE} (task_id, status, document, content_type, content_encoding,
                     date_done, expires_at)
VALUES (:task_id, :status, :document, :content_type, :content_encoding,
        :date_done, :expires_at)
ON CONFLICT (task_id) DO UPDATE SET
    status = excluded.status,
    document = excluded.document,
    content_type = excluded.content_type,
    content_encoding = excluded.content_encoding,
    date_done = excluded.date_done,
    expires_at = excluded.expires_at
WHERE {TABLE}.status != 'SUCCESS'
   OR ({TABLE}.expires_at IS NOT NULL AND {TABLE}.expires_at <= :now)
"""

_SELECT = f"SELECT document, content_type, content_encoding FROM {TABLE}"
_GET = f"{_SELECT} WHERE task_id = :task_id AND {_LIVE}"
_STATUS = f"SELECT status FROM {TABLE} WHERE task_id = :task_id AND {_LIVE}"
_FORGET = f"DELETE FROM {TABLE} WHERE task_id = :task_id"
_CLEANUP = f"DELETE FROM {TABLE} WHERE expires_at IS NOT NULL AND expires_at <= :now"

# An expired counter starts again from zero, as an expired Redis key would.
_INCR = f"""
INSERT INTO {COUNTERS} (key, value, expires_at) VALUES (:key, :amount, :expires_at)
ON CONFLICT (key) DO UPDATE SET
    value = CASE WHEN {COUNTERS}.expires_at IS NOT NULL AND {COUNTERS}.expires_at <= :now
                 THEN :amount ELSE {COUNTERS}.value + :amount END,
    expires_at = :expires_at
RETURNING value
"""
_DELETE_COUNTER = f"DELETE FROM {COUNTERS} WHERE key = :key"
_CLEANUP_COUNTERS = f"DELETE FROM {COUNTERS} WHERE expires_at IS NOT NULL AND expires_at <= :now"

# SQLite's default limit on bound parameters is 32766 since 3.32 but 999 before.
_IDS_PER_QUERY = 500

BUSY_TIMEOUT_MS = 5000
# ``busy_timeout`` already waits inside SQLite; these retries cover the cases where
# SQLite returns SQLITE_BUSY at once (e.g. a read transaction that cannot be upgraded).
_LOCKED_RETRY_FIRST = 0.001
_LOCKED_RETRY_MAX = 0.1
_LOCKED_RETRY_FOR = 30.0


def database_path(url: str) -> Path:
    """``sqlite:///relative.db`` → ``relative.db``; ``sqlite:////abs.db`` → ``/abs.db``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigurationError(f"not a SQLite URL (expected {prefix}<path>): {url!r}")
    path = url[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"{url!r}: the SQLite backend needs a file other processes can open;"
            " use memory:// for an in-process store"
        )
    return Path(path)


def _is_locked(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


_FORK_SENSITIVE: weakref.WeakSet[_Signal | _Connections] = weakref.WeakSet()


def _renew_locks_in_child() -> None:
    # A lock another thread held at the moment of the fork stays held forever in the child.
    global _SIGNALS_LOCK
    _SIGNALS_LOCK = threading.Lock()
    for owner in list(_FORK_SENSITIVE):
        owner.renew_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks_in_child)


class _Signal:
    """Wakes waiters in this process when any backend here stores into the same file."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.count = 0

    def notify(self) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self.changed:
            if self.count == seen:
                self.changed.wait(timeout)

    def renew_lock(self) -> None:
        self.changed = threading.Condition()


_SIGNALS: dict[Path, _Signal] = {}
_SIGNALS_LOCK = threading.Lock()


def _signal_for(path: Path) -> _Signal:
    with _SIGNALS_LOCK:
        if path not in _SIGNALS:
            _SIGNALS[path] = signal = _Signal()
            _FORK_SENSITIVE.add(signal)
        return _SIGNALS[path]


class _Holder:
    """A thread's connection; dropping it (the thread ended) closes the connection."""

    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.pid = os.getpid()


class _Connections:
    """One connection per thread and process.

    A connection inherited through ``os.fork`` is never used or closed by the child (its
    locks and WAL mapping belong to the parent); the child opens its own.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        _FORK_SENSITIVE.add(self)
        self._open: set[sqlite3.Connection] = set()
        self._pid = os.getpid()
        # Inherited connections stay referenced so they are never finalized in the child.
        self._inherited: list[sqlite3.Connection] = []

    def get(self) -> sqlite3.Connection:
        holder: _Holder | None = getattr(self._local, "holder", None)
        if holder is not None and holder.pid == os.getpid():
            return holder.connection
        connection = self._connect()
        holder = _Holder(connection)
        weakref.finalize(holder, self._release, connection)
        self._local.holder = holder
        return connection

    def _connect(self) -> sqlite3.Connection:
        with self._lock:
            self._forget_inherited()
            # check_same_thread=False only so close() may close other threads' connections;
            # each connection is otherwise used by the thread that opened it.
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            self._open.add(connection)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            self._release(connection)
            raise
        return connection

    def renew_lock(self) -> None:
        self._lock = threading.Lock()

    def _forget_inherited(self) -> None:
        if self._pid != os.getpid():
            self._inherited.extend(self._open)
            self._open = set()
            self._pid = os.getpid()

    def _release(self, connection: sqlite3.Connection) -> None:
        with self._lock:
            self._forget_inherited()
            if connection not in self._open:
                return
            self._open.discard(connection)
        connection.close()

    def close_all(self) -> None:
        with self._lock:
            self._forget_inherited()
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()
        self._local = threading.local()


class SqliteBackend(ResultBackend):
    """Results in a SQLite file (WAL mode), readable by every process on the machine."""

    scheme = "sqlite"
    supports_counters = True

    def __init__(
        self,
        url: str = "sqlite:///conveyor.db",
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
    ) -> None:
        super().__init__(url, serializer=serializer, accept=accept, expires=expires)
        self.path = database_path(url)
        self._signal = _signal_for(self.path.resolve())
        self._connections = _Connections(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot create {self.path.parent}: {exc}") from exc
        self._run(self._create_schema)

    # -- plumbing --------------------------------------------------------------------------
    @staticmethod
    def _create_schema(connection: sqlite3.Connection) -> None:
        # WAL lets readers poll while a writer commits; the mode is stored in the file.
        connection.execute("PRAGMA journal_mode = WAL")
        for statement in _SCHEMA:
            connection.execute(statement)

    def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` on this thread's connection, retrying while the file is locked."""
        delay = _LOCKED_RETRY_FIRST
        give_up = time.monotonic() + _LOCKED_RETRY_FOR
        while True:
            try:
                return operation(self._connections.get())
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise BackendError(f"{self.path}: {exc}") from exc
                if time.monotonic() + delay > give_up:
                    raise BackendUnavailable(f"{self.path} stayed locked: {exc}") from exc
            except sqlite3.Error as exc:
                raise BackendError(f"{self.path}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, _LOCKED_RETRY_MAX)

    def _fetch_all(self, query: str, params: list[Any] | dict[str, Any]) -> list[Any]:
        return self._run(lambda connection: connection.execute(query, params).fetchall())

    def _decode_row(self, row: tuple[bytes, str, str]) -> Meta:
        document, content_type, content_encoding = row
        return self.decode(bytes(document), content_type, content_encoding)

    # -- the contract ----------------------------------------------------------------------
    def store(self, task_id: str, meta: Mapping[str, Any]) -> None:
        document, content_type, content_encoding = self.encode(meta)
        now = time.time()
        date_done = meta.get("date_done")
        params = {
            "task_id": task_id,
            "status": str(meta.get("status")),
            "document": document,
            "content_type": content_type,
            "content_encoding": content_encoding,
            "date_done": None if date_done is None else str(date_done),
            # Celery treats both None and 0 as "never expire".
            "expires_at": now + self.expires if self.expires else None,
            "now": now,
        }
        self._run(lambda connection: connection.execute(_STORE, params))
        self._signal.notify()

    def get(self, task_id: str) -> Meta | None:
        params = {"task_id": task_id, "now": time.time()}
        row = self._run(lambda connection: connection.execute(_GET, params).fetchone())
        return None if row is None else self._decode_row(row)

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Meta]:
        ids = list(dict.fromkeys(task_ids))
        rows: list[tuple[str, bytes, str, str]] = []
        now = time.time()
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            query = (
                f"SELECT task_id, document, content_type, content_encoding FROM {TABLE}"
                f" WHERE task_id IN ({marks}) AND (expires_at IS NULL OR expires_at > ?)"
            )
            rows.extend(self._fetch_all(query, [*chunk, now]))
        return {task_id: self._decode_row((doc, ct, ce)) for task_id, doc, ct, ce in rows}

    def _ready_status(self, task_id: str) -> bool:
        params = {"task_id": task_id, "now": time.time()}
        row = self._run(lambda connection: connection.execute(_STATUS, params).fetchone())
        return row is not None and row[0] in states.READY_STATES

    def _data_version(self) -> int:
        row = self._run(lambda connection: connection.execute("PRAGMA data_version").fetchone())
        return int(row[0])

    def wait(self, task_id: str, timeout: float | None = None) -> Meta:
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = POLL_FIRST
        while True:
            # Take both change markers before looking, so a store that lands between the
            # look and the sleep is noticed instead of slept through.
            seen_local = self._signal.count
            seen_version = self._data_version()
            if self._ready_status(task_id):
                meta = self.get(task_id)
                if meta is not None and meta.get("status") in states.READY_STATES:
                    return meta
            while True:
                pause = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"task {task_id} not ready after {timeout}s")
                    pause = min(pause, left)
                self._signal.wait(seen_local, pause)
                interval = min(interval * 2, POLL_MAX)
                if self._signal.count != seen_local or self._data_version() != seen_version:
                    break

    def forget(self, task_id: str) -> None:
        params = {"task_id": task_id}
        self._run(lambda connection: connection.execute(_FORGET, params))

    def incr(self, key: str, amount: int = 1, expires: float | None = None) -> int:
        now = time.time()
        params = {
            "key": key,
            "amount": amount,
            "expires_at": None if expires is None else now + expires,
            "now": now,
        }
        # fetchall steps the statement to its end, which is what commits it.
        rows = self._fetch_all(_INCR, params)
        return int(rows[0][0])

    def delete_counter(self, key: str) -> None:
        params = {"key": key}
        self._run(lambda connection: connection.execute(_DELETE_COUNTER, params))

    def cleanup(self) -> int:
        params = {"now": time.time()}

        def delete_expired(connection: sqlite3.Connection) -> int:
            connection.execute(_CLEANUP_COUNTERS, params)
            return connection.execute(_CLEANUP, params).rowcount

        return self._run(delete_expired)

    def check(self) -> None:
        try:
            self._run(lambda connection: connection.execute("SELECT 1").fetchone())
        except BackendError as exc:
            raise BackendUnavailable(str(exc)) from exc

    def close(self) -> None:
        self._connections.close_all()
