"""The embedded result backend: one SQLite file, shared by every process on the machine.

The file is often the same one the SQLite broker uses; results live in their own
``conveyor_results`` table (and chord counters in ``conveyor_counters``) so both fit
in one database. Each row holds the encoded
result document plus the few columns the backend itself needs to query (status and
expiry), so the document keeps Celery's exact shape and serializer.

``wait`` learns about results stored by this process through a doorbell and about
results stored by other processes by polling ``PRAGMA data_version``, which changes only
when another connection commits, so an idle wait costs one pragma per interval (0.5 ms
growing to 50 ms). Connections, retries and that waiting are
:mod:`conveyor.sqlite_store`'s.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from typing import Any

from conveyor import states
from conveyor.backends.base import POLL_FIRST, POLL_MAX, Meta, ResultBackend
from conveyor.errors import BackendError, BackendUnavailable, TimeoutError
from conveyor.sqlite_store import SqliteStore, database_path, poll_intervals

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

# How long SQLite itself waits for a lock before the store's retries take over.
BUSY_TIMEOUT_MS = 5000


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
        self._store = SqliteStore(
            self.path,
            setup=_create_tables,
            error=BackendError,
            unavailable=BackendUnavailable,
            doorbell="results",
            busy_timeout=BUSY_TIMEOUT_MS / 1000,
        )
        self._connections = self._store.connections
        self._signal = self._store.doorbell  # rung on every store()
        # Open now, so a bad path or a newer schema fails here rather than at first use.
        self._connections.get()

    # -- plumbing --------------------------------------------------------------------------
    def _fetch_all(self, query: str, params: list[Any] | dict[str, Any]) -> list[Any]:
        return self._store.run(lambda connection: connection.execute(query, params).fetchall())

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
        self._store.run(lambda connection: connection.execute(_STORE, params))
        self._signal.ring()

    def get(self, task_id: str) -> Meta | None:
        params = {"task_id": task_id, "now": time.time()}
        row = self._store.run(lambda connection: connection.execute(_GET, params).fetchone())
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
        row = self._store.run(lambda connection: connection.execute(_STATUS, params).fetchone())
        return row is not None and row[0] in states.READY_STATES

    def wait(self, task_id: str, timeout: float | None = None, *,
             just_sent: bool = False) -> Meta:
        deadline = None if timeout is None else time.monotonic() + timeout
        # One schedule for the whole wait: a change that was not our result does not
        # bring the polling back to its fastest.
        poll = poll_intervals(POLL_FIRST, POLL_MAX)
        while True:
            seen = self._store.mark()
            if self._ready_status(task_id):
                meta = self.get(task_id)
                if meta is not None and meta.get("status") in states.READY_STATES:
                    return meta
            if not self._store.wait_for_change(seen, deadline, poll=poll):
                raise TimeoutError(f"task {task_id} not ready after {timeout}s")

    def forget(self, task_id: str) -> None:
        params = {"task_id": task_id}
        self._store.run(lambda connection: connection.execute(_FORGET, params))

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
        self._store.run(lambda connection: connection.execute(_DELETE_COUNTER, params))

    def cleanup(self) -> int:
        params = {"now": time.time()}

        def delete_expired(connection: sqlite3.Connection) -> int:
            connection.execute(_CLEANUP_COUNTERS, params)
            return connection.execute(_CLEANUP, params).rowcount

        return self._store.run(delete_expired)

    def check(self) -> None:
        self._store.check()

    def close(self) -> None:
        self._store.close()


def _create_tables(connection: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        connection.execute(statement)
