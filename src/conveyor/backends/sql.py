"""The SQL result backend (SQLAlchemy 2): PostgreSQL, MySQL/MariaDB and SQLite.

URLs are Celery's: ``db+postgresql://user@host/db``, ``db+mysql://user@host/db``,
``db+sqlite:///results.db``, with an optional driver (``db+postgresql+psycopg://``).
Without one, PostgreSQL uses psycopg 3 and MySQL PyMySQL (the drivers of the ``sql``
extra; SQLAlchemy's own defaults, psycopg2 and mysqlclient, are not installed).

Rows live in Celery's tables (``sql_schema``), so Celery's ``AsyncResult`` reads results
Conveyor stored and the other way round. Transport options, named as Celery's settings:
``database_table_names`` / ``database_table_schemas`` (``{"task": ..., "group": ...}``,
plus Conveyor's ``"counter"``), ``database_engine_options`` (passed to
``create_engine``; pooling defaults to Celery's ``pool_pre_ping`` and ``pool_recycle``),
and ``listen`` (PostgreSQL LISTEN/NOTIFY, default on; off, stores send no NOTIFY and
waiters poll).

Expiry: a row Conveyor writes expires ``result_expires`` after the write (``expires_at``);
``get`` reads an expired row as missing, as every Conveyor backend does, and ``cleanup``
deletes it. Rows Celery writes carry no deadline: readers see them until a cleanup
deletes them by Celery's own rule (``date_done`` older than ``result_expires``), which is
exactly when Celery's ``backend_cleanup`` would.

Waiting: on PostgreSQL each store of a ready state sends ``NOTIFY`` in the same
transaction, and one ``LISTEN`` connection per backend wakes its waiters at once; they
still look every second, for results a Celery worker stored (Celery does not notify).
Elsewhere ``wait`` polls with the base backoff (0.5 ms growing to 50 ms).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from conveyor import serialization, states
from conveyor.backends.base import POLL_FIRST, POLL_MAX, Meta, ResultBackend, group_members
from conveyor.backends.sql_listener import Listener
from conveyor.backends.sql_schema import build_tables, create_tables, meta_from_row, row_from_meta
from conveyor.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    EncodeError,
    TimeoutError,
)

T = TypeVar("T")

_DEFAULT_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}
# Celery's database_engine_options defaults: drop dead pooled connections before use.
_ENGINE_DEFAULTS: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": 3600}
_SQLITE_BUSY_TIMEOUT = 30.0

_ATTEMPTS = 5
_RETRY_FIRST = 0.01
_RETRY_MAX = 0.5
_IDS_PER_QUERY = 500

# With LISTEN working, waiters are woken by NOTIFY; this slow look is only for results
# stored without a NOTIFY (by Celery, or a writer with ``listen`` off).
LISTEN_POLL_MAX = 1.0



def sqlalchemy_url(url: str) -> sa.URL:
    """Celery's ``db+<sqlalchemy url>`` → SQLAlchemy's URL, with an installed driver."""
    if not url.startswith("db+"):
        raise ConfigurationError(f"not a database backend URL (expected db+<dialect>://): {url!r}")
    try:
        parsed = sa.make_url(url[3:])
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"cannot parse database URL: {exc}") from None
    parsed = parsed.set(drivername=_DEFAULT_DRIVERS.get(parsed.drivername, parsed.drivername))
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            f"{url!r}: a SQLite result backend needs a file every process can open"
            " (db+sqlite:///results.db); use memory:// for an in-process store"
        )
    return parsed


def _now() -> datetime:
    """Naive UTC, the form of every datetime column."""
    return datetime.now(UTC).replace(tzinfo=None)


def _rolled_back(error: sa_exc.DBAPIError) -> bool:
    """A deadlock, serialization failure or busy database: nothing was written."""
    orig = error.orig
    if getattr(orig, "sqlstate", None) in {"40001", "40P01"}:
        return True
    code = orig.args[0] if orig is not None and orig.args else None
    if code in {1205, 1213}:  # MySQL/MariaDB lock wait timeout, deadlock
        return True
    return "database is locked" in str(orig)


def _fetch_all(query: sa.Select[Any], connection: Connection) -> list[sa.Row[Any]]:
    return list(connection.execute(query).all())


class SqlBackend(ResultBackend):
    """Results in Celery's database tables, through a pooled SQLAlchemy engine."""

    scheme = "db"
    supports_counters = True

    def __init__(
        self,
        url: str = "db+sqlite:///results.db",
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
        database_table_names: Mapping[str, str] | None = None,
        database_table_schemas: Mapping[str, str | None] | None = None,
        database_engine_options: Mapping[str, Any] | None = None,
        listen: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for the database result backend: {', '.join(sorted(unknown))}"
                "; known: database_table_names, database_table_schemas,"
                " database_engine_options, listen"
            )
        super().__init__(url, serializer=serializer, accept=accept, expires=expires)
        self.sa_url = sqlalchemy_url(url)
        self._where = self.sa_url.render_as_string(hide_password=True)
        self.tables = build_tables(database_table_names or {}, database_table_schemas or {})
        self._engine = self._create_engine(dict(database_engine_options or {}))
        self._tables_ready = threading.Event()
        self._tables_lock = threading.Lock()
        dialect = self._engine.dialect.name
        self._postgresql = dialect == "postgresql"
        self._mysql = dialect in {"mysql", "mariadb"}
        task = self.tables.task
        self._channel = (
            "conveyor_"
            + hashlib.sha1(
                f"{task.schema}.{task.name}".encode(), usedforsecurity=False
            ).hexdigest()[:20]
        )
        self._notify = listen and self._postgresql
        # The listener speaks psycopg 3 (its notifies() and socket); other drivers poll.
        psycopg = self._engine.dialect.driver == "psycopg"
        self._listener = Listener(self._engine, self._channel) if self._notify and psycopg else None
        _LIVE.add(self)

    def _create_engine(self, options: dict[str, Any]) -> Engine:
        merged = {**_ENGINE_DEFAULTS, **options}
        sqlite_file = self.sa_url.get_backend_name() == "sqlite"
        if sqlite_file:
            merged["connect_args"] = {
                "timeout": _SQLITE_BUSY_TIMEOUT,
                **merged.get("connect_args", {}),
            }
        try:
            engine = sa.create_engine(self.sa_url, **merged)
        except (ImportError, sa_exc.ArgumentError, TypeError) as exc:
            # A driver that isn't installed, or an engine option it doesn't take.
            raise ConfigurationError(f"cannot use {self._where}: {exc}") from exc
        if not sqlite_file:
            return engine

        def use_wal(dbapi_connection: Any, _record: Any) -> None:
            # Readers keep polling while a writer commits; the mode is kept in the file.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        sa.event.listen(engine, "connect", use_wal)
        return engine

    # -- plumbing --------------------------------------------------------------------------
    def _execute(self, operation: Callable[[Connection], T], *, idempotent: bool = True) -> T:
        """Run ``operation`` in one transaction, retrying what is safe to retry."""
        delay = _RETRY_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._engine.begin() as connection:
                    return operation(connection)
            except sa_exc.DBAPIError as exc:
                # A lost connection may have lost the write too, so only operations that
                # can run twice retry it; a rolled-back deadlock can always run again.
                lost = exc.connection_invalidated or isinstance(
                    exc, (sa_exc.OperationalError, sa_exc.InterfaceError)
                )
                if attempt == _ATTEMPTS or not (_rolled_back(exc) or (idempotent and lost)):
                    raise self._translate(exc) from exc
            time.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _translate(self, error: sa_exc.DBAPIError) -> BackendError:
        message = f"{self._where}: {error.orig}"
        if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return BackendUnavailable(message)
        return BackendError(message)

    def _run(self, operation: Callable[[Connection], T], *, idempotent: bool = True) -> T:
        self._ensure_tables()
        return self._execute(operation, idempotent=idempotent)

    def _ensure_tables(self) -> None:
        if self._tables_ready.is_set():
            return
        with self._tables_lock:
            if self._tables_ready.is_set():
                return
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    self._execute(lambda connection: create_tables(connection, self.tables))
                    break
                except BackendUnavailable:
                    raise
                except BackendError:
                    # Another process may have created them between our look and our
                    # CREATE; the next look finds them.
                    if attempt == _ATTEMPTS:
                        raise
                    time.sleep(_RETRY_FIRST * attempt)
            self._tables_ready.set()

    def _clock(self) -> datetime:
        """Now, once the tables exist: creating them can take longer than a short expiry."""
        self._ensure_tables()
        return _now()

    def _load(self, payload: Any) -> Any:
        return serialization.loads_untyped(bytes(payload), self.serializer, self.accept)

    def _dump(self, value: Any) -> bytes:
        return serialization.dumps(value, self.serializer)[0]

    def _replaceable(self, now: datetime) -> sa.ColumnElement[bool]:
        task = self.tables.task
        # A stored SUCCESS is final until it expires (an expired row reads as missing).
        return sa.or_(
            sa.func.coalesce(task.c.status, "") != states.SUCCESS, task.c.expires_at <= now
        )

    def _live(self, now: datetime) -> sa.ColumnElement[bool]:
        expires_at = self.tables.task.c.expires_at
        return sa.or_(expires_at.is_(None), expires_at > now)

    # -- the contract ----------------------------------------------------------------------
    def store(self, task_id: str, meta: Mapping[str, Any]) -> None:
        now = self._clock()
        row = row_from_meta(task_id, meta, self._dump, now)
        # Celery treats both None and 0 as "never expire".
        row["expires_at"] = now + timedelta(seconds=self.expires) if self.expires else None
        try:
            if self._mysql:
                self._store_by_update_or_insert(row, now)
            else:
                self._run(lambda connection: self._upsert(connection, row, now))
        except BackendError as exc:
            if isinstance(exc.__cause__, sa_exc.DataError):
                # The database refused a value (too long for its column, a NUL in text):
                # the same verdict as a serializer's, so the worker stores why instead.
                raise EncodeError(f"the database refused the result of {task_id}: {exc}") from exc
            raise

    def _upsert(self, connection: Connection, row: dict[str, Any], now: datetime) -> None:
        task = self.tables.task
        insert = (postgresql.insert if self._postgresql else sqlite.insert)(task).values(row)
        insert = insert.on_conflict_do_update(
            index_elements=[task.c.task_id],
            set_={name: insert.excluded[name] for name in row if name != "task_id"},
            where=self._replaceable(now),
        )
        connection.execute(insert)
        if self._notify and row["status"] in states.READY_STATES:
            # Delivered at commit, with the row; never before it.
            connection.execute(sa.select(sa.func.pg_notify(self._channel, row["task_id"])))

    def _store_by_update_or_insert(self, row: dict[str, Any], now: datetime) -> None:
        # MySQL's ON DUPLICATE KEY UPDATE assigns columns one by one, so a condition on the
        # old status can't guard every column. An UPDATE guarded by the condition, then an
        # INSERT if no row matched, each its own transaction (no gap locks held between).
        task = self.tables.task
        values = {name: value for name, value in row.items() if name != "task_id"}
        update = (
            task.update()
            .values(values)
            .where(task.c.task_id == row["task_id"], self._replaceable(now))
        )
        insert = task.insert().values(row)

        def updated(connection: Connection) -> bool:
            return connection.execute(update).rowcount > 0

        def inserted(connection: Connection) -> bool:
            try:
                connection.execute(insert)
            except sa_exc.IntegrityError:
                return False  # a row appeared since the UPDATE looked
            return True

        for _ in range(2):
            if self._run(updated) or self._run(inserted):
                return
        # The row exists and the UPDATE matched nothing: it is a SUCCESS, which stays.

    def _select(self) -> sa.Select[Any]:
        task = self.tables.task
        return sa.select(*[column for column in task.columns if column.name != "id"])

    def get(self, task_id: str) -> Meta | None:
        query = self._select().where(
            self.tables.task.c.task_id == task_id, self._live(self._clock())
        )
        row = self._run(lambda connection: connection.execute(query).first())
        return None if row is None else meta_from_row(row, self._load)

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Meta]:
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, Meta] = {}
        now = self._clock()
        for start in range(0, len(ids), _IDS_PER_QUERY):
            query = self._select().where(
                self.tables.task.c.task_id.in_(ids[start : start + _IDS_PER_QUERY]), self._live(now)
            )
            for row in self._run(partial(_fetch_all, query)):
                found[row.task_id] = meta_from_row(row, self._load)
        return found

    def wait(self, task_id: str, timeout: float | None = None, *,
             just_sent: bool = False) -> Meta:
        if self._listener is None:
            return super().wait(task_id, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = POLL_FIRST
        with self._listener.watch(task_id) as woken:
            while True:
                # Clear before looking: a NOTIFY that lands after the look sets it again.
                woken.clear()
                meta = self.get(task_id)
                if meta is not None and meta.get("status") in states.READY_STATES:
                    return meta
                pause = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"task {task_id} not ready after {timeout}s")
                    pause = min(pause, left)
                woken.wait(pause)
                ceiling = LISTEN_POLL_MAX if self._listener.listening else POLL_MAX
                interval = min(interval * 2, ceiling)

    def forget(self, task_id: str) -> None:
        task = self.tables.task
        self._run(
            lambda connection: connection.execute(task.delete().where(task.c.task_id == task_id))
        )

    # -- groups: Celery's celery_tasksetmeta ---------------------------------------------------
    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Celery's ``GroupResult.save()`` row: the group tuple, serialized, in ``result``."""
        members = [[[task_id, None], None] for task_id in task_ids]
        group = self.tables.group
        row = {
            "taskset_id": group_id,
            "result": self._dump([[group_id, None], members]),
            "date_done": self._clock(),
        }

        def replace(connection: Connection) -> None:
            if self._mysql:
                insert = mysql.insert(group).values(row)
                connection.execute(
                    insert.on_duplicate_key_update(
                        result=insert.inserted.result, date_done=insert.inserted.date_done
                    )
                )
                return
            upsert = (postgresql.insert if self._postgresql else sqlite.insert)(group).values(row)
            connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=[group.c.taskset_id],
                    set_={"result": upsert.excluded.result, "date_done": upsert.excluded.date_done},
                )
            )

        self._run(replace)

    def get_group(self, group_id: str) -> list[str] | None:
        group = self.tables.group
        query = sa.select(group.c.result).where(group.c.taskset_id == group_id)
        payload = self._run(lambda connection: connection.execute(query).scalar_one_or_none())
        return None if payload is None else group_members(self._load(payload))

    def forget_group(self, group_id: str) -> None:
        group = self.tables.group
        self._run(
            lambda connection: connection.execute(
                group.delete().where(group.c.taskset_id == group_id)
            )
        )

    # -- counters ------------------------------------------------------------------------------
    def incr(self, key: str, amount: int = 1, expires: float | None = None) -> int:
        now = self._clock()
        expires_at = None if expires is None else now + timedelta(seconds=expires)
        counter = self.tables.counter
        # An expired counter starts again from zero, as an expired Redis key would.
        expired = sa.and_(counter.c.expires_at.is_not(None), counter.c.expires_at <= now)

        def count(connection: Connection) -> int:
            if self._mysql:
                # No RETURNING here. The upsert keeps the row locked until commit, so a
                # read in the same transaction sees exactly the value it wrote.
                insert = mysql.insert(counter).values(name=key, value=amount, expires_at=expires_at)
                insert = insert.on_duplicate_key_update(
                    [
                        # Listed first so it still sees the old expires_at.
                        ("value", sa.case((expired, amount), else_=counter.c.value + amount)),
                        ("expires_at", insert.inserted.expires_at),
                    ]
                )
                connection.execute(insert)
                current = sa.select(counter.c.value).where(counter.c.name == key)
                return int(connection.execute(current.with_for_update()).scalar_one())
            upsert = (postgresql.insert if self._postgresql else sqlite.insert)(counter).values(
                name=key, value=amount, expires_at=expires_at
            )
            returning = upsert.on_conflict_do_update(
                index_elements=[counter.c.name],
                set_={
                    "value": sa.case(
                        (expired, upsert.excluded.value),
                        else_=counter.c.value + upsert.excluded.value,
                    ),
                    "expires_at": upsert.excluded.expires_at,
                },
            ).returning(counter.c.value)
            return int(connection.execute(returning).scalar_one())

        # Not idempotent: retried only when the database says nothing was written.
        return self._run(count, idempotent=False)

    def delete_counter(self, key: str) -> None:
        counter = self.tables.counter
        self._run(
            lambda connection: connection.execute(counter.delete().where(counter.c.name == key))
        )

    def cleanup(self) -> int:
        now = self._clock()
        task, group, counter = self.tables.task, self.tables.group, self.tables.counter

        def delete_expired(connection: Connection) -> int:
            deleted = connection.execute(task.delete().where(task.c.expires_at <= now)).rowcount
            if self.expires:
                # Celery's rule, for rows without a deadline of their own.
                cutoff = now - timedelta(seconds=self.expires)
                deleted += connection.execute(
                    task.delete().where(task.c.expires_at.is_(None), task.c.date_done < cutoff)
                ).rowcount
                deleted += connection.execute(
                    group.delete().where(group.c.date_done < cutoff)
                ).rowcount
            connection.execute(counter.delete().where(counter.c.expires_at <= now))
            return deleted

        return self._run(delete_expired)

    def check(self) -> None:
        try:
            with self._engine.connect() as connection:
                connection.execute(sa.select(1))
        except sa_exc.DBAPIError as exc:
            raise BackendUnavailable(f"{self._where}: {exc.orig}") from exc

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._engine.dispose()

    def _after_fork_in_child(self) -> None:
        # The parent's pooled connections and listener are the parent's: never used or
        # closed here (closing would end the parent's sessions too).
        self._engine.dispose(close=False)
        self._tables_lock = threading.Lock()
        if self._listener is not None:
            _INHERITED.append(self._listener)
            self._listener = Listener(self._engine, self._channel)


_LIVE: weakref.WeakSet[SqlBackend] = weakref.WeakSet()
_INHERITED: list[Listener] = []


def _renew_in_child() -> None:
    for backend in list(_LIVE):
        backend._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)
