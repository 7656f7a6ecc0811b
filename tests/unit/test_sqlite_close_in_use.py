"""Closing a SQLite store while another thread runs a statement on it: the close waits
for the statement, never closes the connection under it (which can crash sqlite3)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from conveyor.errors import BackendError, BackendUnavailable
from conveyor.sqlite_store import SqliteStore

PATIENCE = 10.0


def make_store(path: Path) -> SqliteStore:
    def setup(connection: sqlite3.Connection) -> None:
        connection.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")

    return SqliteStore(path, setup=setup, error=BackendError, unavailable=BackendUnavailable,
                       doorbell="results")


def test_close_waits_for_a_statement_another_thread_is_running(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s.db")
    inside, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def work(connection: sqlite3.Connection) -> object:
        inside.set()
        release.wait(PATIENCE)
        return connection.execute("SELECT 41 + 1").fetchone()[0]

    def user() -> None:
        try:
            outcome.append(store.run(work))
        except Exception as exc:  # what the test reports if the connection was closed
            outcome.append(exc)

    using = threading.Thread(target=user)
    using.start()
    assert inside.wait(PATIENCE)
    closing = threading.Thread(target=store.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # waiting for the statement
    release.set()
    using.join(PATIENCE)
    closing.join(PATIENCE)
    assert not closing.is_alive()
    assert outcome == [42]
    # The thread that used it opens a new connection on its next use.
    assert store.run(lambda connection: connection.execute("SELECT 1").fetchone()[0]) == 1
    store.close()
