"""One SQLite file shared by the threads and processes of a machine.

The SQLite broker and the SQLite result backend (often on the same file) both need the
same things from it, and this module is where they live:

- :func:`database_path` reads ``sqlite:///relative.db`` and ``sqlite:////abs.db`` URLs.
- :class:`SqliteStore` gives each thread its own connection (WAL journal), runs
  transactions (``BEGIN IMMEDIATE`` to write, ``BEGIN`` to read), retries while the file
  is locked and reports SQLite's errors as the caller's own error classes.
- :meth:`SqliteStore.wait_for_change` sleeps until the data may have changed: objects in
  this process ring a :class:`FileDoorbell` shared by every object on the file, and
  commits by other processes show as ``PRAGMA data_version`` moving, which is polled at
  an interval that doubles (1 ms to 50 ms by default) while nothing changes.

A forked child opens its own connections and never uses or closes the ones it inherited:
they share the parent's file locks and WAL index, which SQLite forbids carrying across
``fork``.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote

from conveyor.brokers.virtual import Doorbell
from conveyor.errors import ConfigurationError, ConveyorError

T = TypeVar("T")

SYNCHRONOUS_MODES = frozenset({"off", "normal", "full", "extra"})

# ``busy_timeout`` already waits inside SQLite; these retries cover the SQLITE_BUSY that
# SQLite returns at once (WAL recovery, a read snapshot that cannot be upgraded).
RETRY_FIRST = 0.001
RETRY_MAX = 0.1
RETRY_FOR = 30.0
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

POLL_FIRST = 0.001
POLL_MAX = 0.05


def database_path(url: str) -> Path:
    """``sqlite:///relative.db`` (from the current directory) or ``sqlite:////abs.db``."""
    prefix = "sqlite:///"
    path = unquote(url[len(prefix) :].split("?", 1)[0]) if url.startswith(prefix) else ""
    if not path:
        raise ConfigurationError(
            f"not a SQLite URL: {url!r}; use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    if path == ":memory:":
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between threads and processes; "
            "use memory:// to keep everything in one process"
        )
    return Path(path)


def poll_intervals(first: float = POLL_FIRST, most: float = POLL_MAX) -> Iterator[float]:
    """``first``, then twice the last, up to ``most``: how long to sleep between polls."""
    interval = first
    while True:
        yield interval
        interval = min(interval * 2, most)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


# -- one connection per thread ------------------------------------------------------------
# Connections a forked child inherited: using or even closing them could disturb the
# parent's locks, so the child keeps them referenced (never finalized) and opens its own.
_INHERITED: list[sqlite3.Connection] = []


def _close_if_owner(connection: sqlite3.Connection, owner_pid: int,
                    in_use: threading.RLock) -> None:
    if os.getpid() == owner_pid:
        # Never while its thread runs a statement on it: closing a connection another
        # thread is using can crash the interpreter inside sqlite3.
        with in_use:
            connection.close()
    else:
        _INHERITED.append(connection)


class _ThreadConnection:
    """One thread's connection; when the thread ends, its finalizer closes it."""

    __slots__ = ("__weakref__", "connection", "epoch", "in_use")

    def __init__(self, connection: sqlite3.Connection, epoch: int) -> None:
        self.connection = connection
        self.epoch = epoch
        self.in_use = threading.RLock()


class ThreadConnections:
    """A connection per thread, opened by ``connect`` on first use in that thread."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._start_process_state()

    def _start_process_state(self) -> None:
        """State that belongs to one process; rebuilt in a forked child."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._epoch = 0  # close_all() bumps it; connections of older epochs are closed
        self._finalizers: set[weakref.finalize[Any, Any]] = set()

    @contextmanager
    def using(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, which :meth:`close_all` leaves open meanwhile."""
        while True:
            holder = self._holder()
            with holder.in_use:
                if holder.epoch == self._epoch:  # not closed since it was looked up
                    yield holder.connection
                    return

    def get(self) -> sqlite3.Connection:
        """This thread's connection, opened if need be; statements go through
        :meth:`using`."""
        return self._holder().connection

    def _holder(self) -> _ThreadConnection:
        if os.getpid() != self._pid:
            self._start_process_state()
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is not None and holder.epoch == self._epoch:
            return holder
        connection = self._connect()
        with self._lock:
            holder = _ThreadConnection(connection, self._epoch)
            self._finalizers = {f for f in self._finalizers if f.alive}
            self._finalizers.add(weakref.finalize(holder, _close_if_owner, connection,
                                                  self._pid, holder.in_use))
        self._local.holder = holder
        return holder

    def close_all(self) -> None:
        """Close every thread's connection; a later :meth:`get` opens a new one."""
        if os.getpid() != self._pid:
            # Only inherited connections so far, and those are the parent's to close.
            self._start_process_state()
            return
        with self._lock:
            self._epoch += 1
            finalizers, self._finalizers = self._finalizers, set()
        for finalizer in finalizers:
            finalizer()


# -- wake-ups within this process ---------------------------------------------------------
class FileDoorbell(Doorbell):
    """A :class:`Doorbell` shared by the objects of this process on one file."""

    @property
    def changed(self) -> threading.Condition:
        """The condition waiters sleep on (the result backend's name for it)."""
        return self.condition

    def renew_after_fork(self) -> None:
        # A condition another thread held at the moment of the fork stays held forever
        # in the child.
        self.condition = threading.Condition()


_DOORBELLS: weakref.WeakValueDictionary[tuple[str, Path], FileDoorbell] = (
    weakref.WeakValueDictionary()
)
_DOORBELLS_LOCK = threading.Lock()


def _doorbell_for(name: str, path: Path) -> FileDoorbell:
    # Objects on one file in one process share a doorbell, so a producer and a worker
    # built from separate apps still wake each other without polling.
    with _DOORBELLS_LOCK:
        doorbell = _DOORBELLS.get((name, path))
        if doorbell is None:
            doorbell = _DOORBELLS[name, path] = FileDoorbell()
        return doorbell


def _renew_doorbells_in_child() -> None:
    global _DOORBELLS_LOCK
    _DOORBELLS_LOCK = threading.Lock()
    for doorbell in list(_DOORBELLS.values()):
        doorbell.renew_after_fork()


os.register_at_fork(after_in_child=_renew_doorbells_in_child)


class ChangeMark(NamedTuple):
    """Where the file stood: taken before looking at the data, waited on after."""

    rings: int
    data_version: int


# -- the store ----------------------------------------------------------------------------
class SqliteStore:
    """One SQLite file as one broker or result backend object uses it.

    ``setup`` creates the caller's tables; it runs in a write transaction when this
    store opens its first connection. SQLite errors are raised as ``error``; a file that
    cannot be opened, or stays locked for ``RETRY_FOR`` seconds, as ``unavailable``.
    Objects on the same file ring the same doorbell when their ``doorbell`` names match,
    so the broker's fetches and the backend's waits do not wake each other.
    """

    def __init__(
        self,
        path: Path,
        *,
        setup: Callable[[sqlite3.Connection], object],
        error: type[ConveyorError],
        unavailable: type[ConveyorError],
        doorbell: str,
        busy_timeout: float = 5.0,
        synchronous: str = "normal",
    ) -> None:
        if synchronous.lower() not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        # Absolute, so a thread that first connects after a chdir still opens this file.
        self.path = Path(os.path.abspath(path))
        self.busy_timeout = busy_timeout  # applies to connections opened from then on
        # NORMAL survives any crash of the application; only a power loss can drop the
        # last commits. FULL fsyncs every commit.
        self.synchronous = synchronous.upper()
        self._setup = setup
        self._error = error
        self._unavailable = unavailable
        self._schema_ready = False
        self.connections = ThreadConnections(self._open)
        self.doorbell = _doorbell_for(doorbell, self.path)

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
            raise self._unavailable(f"cannot open SQLite database {self.path}: {exc}") from exc

        def configure() -> None:
            # WAL lets readers go on while a writer commits; the mode is kept in the file.
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {self.synchronous}")

        try:
            self._retry(configure)
            if not self._schema_ready:
                self._transaction(connection, "BEGIN IMMEDIATE", self._setup)
                self._schema_ready = True
        except BaseException:
            connection.close()
            raise
        return connection

    def _retry(self, attempt: Callable[[], T]) -> T:
        pause = RETRY_FIRST
        give_up_at = time.monotonic() + RETRY_FOR
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise self._error(f"SQLite error on {self.path}: {exc}") from exc
                if time.monotonic() >= give_up_at:
                    raise self._unavailable(
                        f"{self.path} stayed locked for {RETRY_FOR:.0f}s: {exc}"
                    ) from exc
            except sqlite3.Error as exc:
                raise self._error(f"SQLite error on {self.path}: {exc}") from exc
            time.sleep(pause * random.uniform(0.5, 1.0))  # jitter: contenders spread out
            pause = min(pause * 2, RETRY_MAX)

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

        return self._retry(attempt)

    # -- running statements -----------------------------------------------------------------
    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in one write transaction on this thread's connection."""
        with self.connections.using() as connection:
            return self._transaction(connection, "BEGIN IMMEDIATE", work)

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in one read transaction (one snapshot) on this thread's connection."""
        with self.connections.using() as connection:
            return self._transaction(connection, "BEGIN", work)

    def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` outside a transaction: each statement commits on its own."""
        with self.connections.using() as connection:
            return self._retry(lambda: work(connection))

    def check(self) -> None:
        """Raise ``unavailable`` unless the file can be read now."""
        try:
            self.read(lambda connection: connection.execute("SELECT 1").fetchone())
        except self._error as exc:
            raise self._unavailable(str(exc)) from exc

    def close(self) -> None:
        """Close every connection opened in this process; later calls open new ones."""
        self.connections.close_all()

    # -- waiting for changes ----------------------------------------------------------------
    def data_version(self) -> int:
        """A number that moves whenever another connection, in any process, commits."""
        row = self.run(lambda connection: connection.execute("PRAGMA data_version").fetchone())
        return int(row[0])

    def mark(self) -> ChangeMark:
        return ChangeMark(self.doorbell.rings, self.data_version())

    def wait_for_change(
        self,
        seen: ChangeMark,
        deadline: float | None,
        *,
        poll: Iterator[float] | None = None,
        due: float | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> bool:
        """Sleep until the file may have changed since ``seen``.

        True once the doorbell rang, another connection committed, or the wall-clock time
        ``due`` came. False when the monotonic ``deadline`` passes (None: never) or when
        ``interrupted``, asked with the doorbell's condition held, says so. ``poll`` gives
        the pauses between looks at ``data_version``; pass one iterator to several calls
        to keep the interval it has grown to.
        """
        pauses = poll_intervals() if poll is None else poll
        doorbell = self.doorbell
        while True:
            pause = next(pauses)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pause = min(pause, remaining)
            if due is not None:
                pause = min(pause, max(0.0, due - time.time()))
            condition = doorbell.condition
            with condition:
                if interrupted is not None and interrupted():
                    return False
                if doorbell.rings == seen.rings:
                    condition.wait(pause)
                    if interrupted is not None and interrupted():
                        return False
                if doorbell.rings != seen.rings:
                    return True
            if self.data_version() != seen.data_version:
                return True
            if due is not None and time.time() >= due:
                return True
