"""What the SQL backend does beyond the shared contract: URLs, tables, expiry and cleanup,
waiting through LISTEN/NOTIFY, bad input end to end, and forks."""

from __future__ import annotations

import importlib
import json
import os
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from tests.sql.conftest import MakeBackend
from tests.sql.databases import Scratch

from conveyor import Conveyor, states, testing
from conveyor.backends import backend_from_url
from conveyor.backends import sql as sql_module
from conveyor.backends.meta import build_meta
from conveyor.backends.sql import SqlBackend, sqlalchemy_url
from conveyor.cli import main
from conveyor.errors import BackendUnavailable, ConfigurationError, EncodeError

PATIENCE = 30.0
UNREACHABLE = "db+postgresql://root@127.0.0.1:1/nowhere"


def new_id() -> str:
    return str(uuid.uuid4())


def success(task_id: str, result: Any = 42) -> dict[str, Any]:
    return build_meta(task_id, states.SUCCESS, result)


def raw_rows(scratch: Scratch, table: sa.Table) -> list[sa.Row[Any]]:
    engine = scratch.admin_engine()
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.select(table)).all())
    finally:
        engine.dispose()


def execute(scratch: Scratch, statement: sa.Executable) -> None:
    engine = scratch.admin_engine()
    try:
        with engine.begin() as connection:
            connection.execute(statement)
    finally:
        engine.dispose()


def eventually(check: Callable[[], bool]) -> bool:
    give_up = time.monotonic() + PATIENCE
    while time.monotonic() < give_up:
        if check():
            return True
        time.sleep(0.02)
    return False


# -- URLs and options (no database needed) --------------------------------------------------
@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("db+postgresql://u@h/db", "postgresql+psycopg"),
        ("db+postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("db+mysql://u@h/db", "mysql+pymysql"),
        ("db+mysql+pymysql://u@h/db", "mysql+pymysql"),
        ("db+sqlite:///results.db", "sqlite"),
    ],
)
def test_celery_urls_map_to_installed_drivers(url: str, driver: str) -> None:
    assert sqlalchemy_url(url).drivername == driver
    # Every spelling is registered, and building a backend does not connect.
    backend = backend_from_url(url)
    try:
        assert isinstance(backend, SqlBackend)
    finally:
        backend.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db",
        "db+sqlite://",
        "db+sqlite:///:memory:",
        "db+nonsense",
        "db+mysql+mysqldb://u@h/db",  # a driver that is not installed
    ],
)
def test_urls_that_cannot_work_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SqlBackend(url)


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="table_name"):
        SqlBackend("db+sqlite:///x.db", table_name="oops")
    with pytest.raises(ConfigurationError, match="bogus"):
        SqlBackend("db+sqlite:///x.db", database_engine_options={"bogus": 1})


def test_passwords_stay_out_of_errors() -> None:
    backend = SqlBackend("db+postgresql://root:s3cret@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(BackendUnavailable) as raised:
            backend.get(new_id())
        assert "s3cret" not in str(raised.value)
        with pytest.raises(BackendUnavailable):
            backend.check()
    finally:
        backend.close()


# -- tables ------------------------------------------------------------------------------
def test_tables_are_created_on_first_use_with_the_names_given(
    make_backend: MakeBackend, scratch: Scratch
) -> None:
    names = {"task": "my_results", "group": "my_groups", "counter": "my_counters"}
    backend = make_backend(database_table_names=names)
    schema = backend.tables.task.schema
    engine = scratch.admin_engine()
    try:
        assert not sa.inspect(engine).get_table_names(schema=schema)
        task_id = new_id()
        backend.store(task_id, success(task_id))
        assert set(sa.inspect(engine).get_table_names(schema=schema)) == set(names.values())
    finally:
        engine.dispose()
    got = backend.get(task_id)
    assert got is not None
    assert got["result"] == 42


def test_columns_hold_celerys_encodings(backend: SqlBackend, scratch: Scratch) -> None:
    task_id = new_id()
    request = {
        "task": "proj.add",
        "args": [2, 3],
        "kwargs": {},
        "hostname": "w@h",
        "retries": 0,
        "delivery_info": {"routing_key": "celery"},
        "group": "g-1",
    }
    meta = build_meta(task_id, states.SUCCESS, {"sum": 5}, request=request, extended=True)
    backend.store(task_id, meta)
    (row,) = raw_rows(scratch, backend.tables.task)
    # The result column holds the value alone, not the document.
    assert json.loads(row.result) == {"sum": 5}
    assert row.status == states.SUCCESS
    assert row.children is None  # Celery writes NULL for no children
    assert row.traceback is None
    assert json.loads(row.args) == [2, 3]
    assert (row.name, row.worker, row.queue, row.group_id) == ("proj.add", "w@h", "celery", "g-1")
    # date_done: naive UTC, the same instant as the document's.
    assert row.date_done.tzinfo is None
    assert row.date_done == datetime.fromisoformat(meta["date_done"]).replace(tzinfo=None)
    assert row.expires_at - row.date_done == pytest.approx(
        timedelta(days=1), abs=timedelta(seconds=5)
    )


def test_results_larger_than_a_blob_round_trip(backend: SqlBackend) -> None:
    # MySQL's BLOB stops at 64 KiB; the tables Conveyor creates use LONGBLOB there.
    task_id = new_id()
    big = "x" * 300_000
    backend.store(task_id, success(task_id, big))
    assert backend.get(task_id)["result"] == big  # type: ignore[index]


def test_stored_twice_with_the_same_document(backend: SqlBackend) -> None:
    # MySQL reports "0 rows changed" for an identical UPDATE unless it counts matches.
    task_id = new_id()
    meta = build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w"})
    backend.store(task_id, meta)
    backend.store(task_id, meta)
    assert backend.get(task_id) == meta


def test_concurrent_writers_never_replace_a_success(make_backend: MakeBackend) -> None:
    task_id = new_id()
    writers = [make_backend() for _ in range(3)]
    barrier = threading.Barrier(len(writers))

    def write(index: int, backend: SqlBackend) -> None:
        barrier.wait(PATIENCE)
        for round_ in range(10):
            if index == 0 and round_ == 3:
                backend.store(task_id, success(task_id, "the one"))
            else:
                backend.store(task_id, build_meta(task_id, states.RETRY, ValueError("x")))

    threads = [threading.Thread(target=write, args=pair) for pair in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
    got = writers[0].get(task_id)
    assert got is not None
    assert (got["status"], got["result"]) == (states.SUCCESS, "the one")


# -- expiry and cleanup ----------------------------------------------------------------------
def test_expired_rows_stay_until_cleanup(make_backend: MakeBackend, scratch: Scratch) -> None:
    short = make_backend(expires=0.2)
    task_id = new_id()
    short.store(task_id, success(task_id))
    assert eventually(lambda: short.get(task_id) is None)
    assert short.get_many([task_id]) == {}
    assert len(raw_rows(scratch, short.tables.task)) == 1  # hidden, not yet deleted
    assert short.cleanup() == 1
    assert raw_rows(scratch, short.tables.task) == []


def test_cleanup_follows_celerys_rule_for_rows_without_a_deadline(
    make_backend: MakeBackend, scratch: Scratch
) -> None:
    # Rows Celery writes have no expires_at: they are deleted once date_done is older
    # than result_expires, exactly when Celery's own cleanup would delete them.
    writer = make_backend(expires=None)
    old, recent = new_id(), new_id()
    writer.store(old, success(old))
    writer.store(recent, success(recent))
    task, group = writer.tables.task, writer.tables.group
    execute(
        scratch, task.update().where(task.c.task_id == old).values(date_done=datetime(2000, 1, 1))
    )
    execute(
        scratch,
        group.insert().values(taskset_id="g-old", result=b"[]", date_done=datetime(2000, 1, 1)),
    )
    assert writer.get(old) is not None  # never hidden on read
    assert writer.cleanup() == 0  # a backend that keeps results forever deletes nothing
    cleaner = make_backend(expires=3600)
    assert cleaner.cleanup() == 2
    assert writer.get(old) is None
    assert writer.get(recent) is not None
    assert raw_rows(scratch, group) == []


def test_cleanup_deletes_expired_counters(make_backend: MakeBackend, scratch: Scratch) -> None:
    backend = make_backend()
    backend.incr("short", expires=0.1)
    backend.incr("forever")
    time.sleep(0.3)
    backend.cleanup()
    assert [row.name for row in raw_rows(scratch, backend.tables.counter)] == ["forever"]


def test_counters_may_go_below_zero(backend: SqlBackend) -> None:
    assert backend.incr("k", -2) == -2
    assert backend.incr("k", 5) == 3


def write_app_module(directory: Path, name: str, url: str, options: dict[str, Any]) -> None:
    (directory / f"{name}.py").write_text(
        textwrap.dedent(f"""
        from conveyor import Conveyor

        app = Conveyor("{name}", broker="memory://{name}", backend={url!r},
                       result_expires=3600,
                       result_backend_transport_options={options!r})
    """)
    )


def test_cli_cleanup(
    make_backend: MakeBackend, scratch: Scratch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_backend(expires=0.1)
    for _ in range(2):
        writer.store(task_id := new_id(), success(task_id))
    time.sleep(0.3)
    name = f"cli_app_{uuid.uuid4().hex[:8]}"
    write_app_module(tmp_path, name, scratch.url, scratch.options)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = importlib.import_module(name).app  # the object the command loads
    used = app.backend
    outcome = CliRunner().invoke(main, ["-A", f"{name}:app", "results", "cleanup"])
    assert outcome.exit_code == 0, outcome.output
    assert "Deleted 2 expired results." in outcome.output
    assert raw_rows(scratch, writer.tables.task) == []
    # The command closed the app it loaded: its pooled sessions are not left to the
    # interpreter's exit (where psycopg reports them as a ResourceWarning).
    assert app.backend is not used
    app.close()


def test_cli_cleanup_says_when_the_database_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"cli_down_{uuid.uuid4().hex[:8]}"
    write_app_module(tmp_path, name, UNREACHABLE, {})
    monkeypatch.syspath_prepend(str(tmp_path))
    outcome = CliRunner().invoke(main, ["-A", f"{name}:app", "results", "cleanup"])
    assert outcome.exit_code == 5, outcome.output
    assert "cannot reach the result backend" in outcome.output


# -- bad input, end to end -------------------------------------------------------------------
@pytest.fixture
def app(scratch: Scratch) -> Iterator[Conveyor]:
    instance = Conveyor(
        "bad",
        broker=f"memory://bad-{uuid.uuid4()}",
        backend=scratch.url,
        result_backend_transport_options=scratch.options,
    )
    yield instance
    instance.close()


def test_an_unencodable_result_is_stored_as_a_failure_that_says_why(app: Conveyor) -> None:
    @app.task(name="bad.opaque")
    def opaque() -> object:
        return object()

    @app.task(name="bad.fine")
    def fine() -> int:
        return 7

    with testing.running_worker(app, pool="threads"):
        result = opaque.delay()
        with pytest.raises(EncodeError, match="could not be serialized") as raised:
            result.get(timeout=PATIENCE)
        assert "bad.opaque" in str(raised.value)
        assert result.state == states.FAILURE
        assert fine.delay().get(timeout=PATIENCE) == 7  # the worker kept going


# -- PostgreSQL: LISTEN/NOTIFY -------------------------------------------------------------
only_postgresql = pytest.mark.parametrize("scratch", ["postgresql"], indirect=True)


@pytest.fixture
def pg_backend(make_backend: MakeBackend) -> SqlBackend:
    return make_backend()


@only_postgresql
def test_a_store_notifies_waiters_of_that_task(
    pg_backend: SqlBackend, make_backend: MakeBackend
) -> None:
    # Only a NOTIFY sets the event: this passes only if stores notify and LISTEN hears them.
    writer, task_id, other = make_backend(), new_id(), new_id()
    listener = pg_backend._listener
    assert listener is not None
    with listener.watch(task_id) as woken:
        assert eventually(lambda: listener.listening)
        woken.clear()
        writer.store(other, success(other))
        writer.store(task_id, build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w"}))
        assert not woken.wait(0.3)  # not ready, and not this task: no wake-up
        writer.store(task_id, success(task_id))
        assert woken.wait(PATIENCE)


@only_postgresql
def test_the_listener_reconnects(
    pg_backend: SqlBackend, make_backend: MakeBackend, scratch: Scratch
) -> None:
    listener = pg_backend._listener
    assert listener is not None
    task_id = new_id()
    query = f'LISTEN "{pg_backend._channel}"'
    pids = (
        sa.select(sa.text("pid"))
        .select_from(sa.text("pg_stat_activity"))
        .where(sa.text("query = :query"))
        .params(query=query)
    )
    engine = scratch.admin_engine()
    try:
        with listener.watch(task_id) as woken:
            assert eventually(lambda: listener.listening)
            with engine.begin() as connection:
                (pid,) = connection.execute(pids).scalars().all()
                connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

            def relistened() -> bool:
                with engine.begin() as connection:
                    now = connection.execute(pids).scalars().all()
                return listener.listening and now not in ([], [pid])

            assert eventually(relistened)
            woken.clear()
            make_backend().store(task_id, success(task_id, "after reconnect"))
            assert woken.wait(PATIENCE)
    finally:
        engine.dispose()
    assert pg_backend.wait(task_id, timeout=PATIENCE)["result"] == "after reconnect"


@only_postgresql
def test_wait_is_woken_by_notify_not_by_polling(
    pg_backend: SqlBackend, make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every look after the first pushed out to an hour, only a NOTIFY ends this wait.
    monkeypatch.setattr(sql_module, "POLL_FIRST", 3600.0)
    monkeypatch.setattr(sql_module, "LISTEN_POLL_MAX", 3600.0)
    listener = pg_backend._listener
    assert listener is not None
    task_id = new_id()
    with listener.watch("warm-up"):
        assert eventually(lambda: listener.listening)
    got: list[Any] = []
    # No timeout: a wait that missed the NOTIFY would sleep for the hour.
    waiter = threading.Thread(
        target=lambda: got.append(pg_backend.wait(task_id)["result"]), daemon=True
    )
    waiter.start()
    time.sleep(0.3)
    make_backend().store(task_id, success(task_id, "woken"))
    waiter.join(PATIENCE)
    assert got == ["woken"]


@only_postgresql
def test_close_stops_the_listener_at_once(pg_backend: SqlBackend) -> None:
    listener = pg_backend._listener
    assert listener is not None
    with listener.watch(new_id()):
        assert eventually(lambda: listener.listening)
    thread = listener._thread
    assert thread is not None
    pg_backend.close()  # wakes the thread through its pipe and joins it
    assert not thread.is_alive()
    assert not listener.listening


# -- fork ------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_connections_of_its_own(backend: SqlBackend) -> None:
    parent_id, child_id = new_id(), new_id()
    backend.store(parent_id, success(parent_id, "parent"))  # the pool now holds a connection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            backend.store(child_id, success(child_id, "child"))
            seen = backend.get(parent_id)
            code = 0 if seen is not None and seen["result"] == "parent" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connection survived the child.
    assert backend.get(child_id)["result"] == "child"  # type: ignore[index]
    assert backend.get(parent_id)["result"] == "parent"  # type: ignore[index]


# -- chords: counted in the database, no polling ----------------------------------------------
def test_a_chord_completes_through_the_counters(app: Conveyor, backend: SqlBackend) -> None:
    from conveyor.canvas import chord

    @app.task(name="bad.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="bad.xsum")
    def xsum(values: list[int]) -> int:
        return sum(values)

    result = chord([add.s(i, i) for i in range(5)], xsum.s()).apply_async()
    testing.run_until_idle(app, timeout=PATIENCE)
    assert result.get(timeout=PATIENCE) == 20
    # Counted with incr, not by a polling celery.chord_unlock task.
    assert backend.supports_counters
    assert app.backend is not None
    assert app.backend.get_group(result.parent.id) is not None  # type: ignore[union-attr]
