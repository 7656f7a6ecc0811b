"""The result backend contract (``conveyor.backends.base``), run against every backend.

A new backend joins by adding a factory to ``FACTORIES``: it receives the fixture request
(to ask for ``tmp_path`` or a service fixture such as ``redis_service``, which skips when
the server is down) and returns a callable that builds backends sharing one store from
keyword options (``serializer``, ``accept``, ``expires``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.memcached.service import require_memcached
from tests.sql.databases import scratch_database

from conveyor import errors, states
from conveyor.backends import sqlite as sqlite_module
from conveyor.backends.base import ResultBackend
from conveyor.backends.memory import MemoryBackend
from conveyor.backends.meta import build_meta, decode_exception
from conveyor.backends.sqlite import SqliteBackend, database_path

MakeBackend = Callable[..., ResultBackend]

# Generous bounds: the machine running the suite is shared and noisy.
PROMPT = 2.0
PATIENCE = 30.0


def memory_factory(request: pytest.FixtureRequest) -> MakeBackend:
    url = f"memory://contract-{uuid.uuid4()}"
    return lambda **options: MemoryBackend(url, **options)


def sqlite_factory(request: pytest.FixtureRequest) -> MakeBackend:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    url = f"sqlite:///{tmp_path / 'results.db'}"
    return lambda **options: SqliteBackend(url, **options)


def sql_factory(dialect: str) -> Callable[[pytest.FixtureRequest], MakeBackend]:
    """db+ URLs: a PostgreSQL schema, MariaDB database or SQLite file per test, dropped after."""

    def factory(request: pytest.FixtureRequest) -> MakeBackend:
        from conveyor.backends.sql import SqlBackend

        # Registered before make_backend's own teardown, so it runs after the backends close.
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        scratch = stack.enter_context(
            scratch_database(dialect, request.getfixturevalue("tmp_path"))
        )
        return lambda **options: SqlBackend(scratch.url, **scratch.options, **options)

    return factory


def memcached_factory(request: pytest.FixtureRequest) -> MakeBackend:
    from conveyor.backends.memcached import MemcachedBackend

    url = require_memcached()
    # Keys can't be listed to delete them afterwards: the suite's own expire soon instead.
    return lambda **options: MemcachedBackend(url, **{"expires": 300, **options})


def redis_factory(request: pytest.FixtureRequest) -> MakeBackend:
    from tests.redis.scratch import contract_backend

    # Its own key prefix in the test database, deleted when the backends close.
    return contract_backend(request.getfixturevalue("redis_service"))


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], MakeBackend]] = {
    "memory": memory_factory,
    "sqlite": sqlite_factory,
    "postgresql": sql_factory("postgresql"),
    "mysql": sql_factory("mysql"),
    "sqlite-sql": sql_factory("sqlite"),
    "memcached": memcached_factory,
    "redis": redis_factory,
}


@pytest.fixture(params=sorted(FACTORIES))
def make_backend(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    factory = FACTORIES[request.param](request)
    made: list[ResultBackend] = []

    def make(**options: Any) -> ResultBackend:
        backend = factory(**options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: MakeBackend) -> ResultBackend:
    return make_backend()


def new_id() -> str:
    return str(uuid.uuid4())


def success(task_id: str, result: Any = 42) -> dict[str, Any]:
    return build_meta(task_id, states.SUCCESS, result)


def store_later(backend: ResultBackend, delay: float, *documents: dict[str, Any]) -> None:
    """Store ``documents`` one by one from another thread, ``delay`` seconds apart."""

    def run() -> None:
        for meta in documents:
            time.sleep(delay)
            backend.store(meta["task_id"], meta)

    threading.Thread(target=run, daemon=True).start()


def eventually_missing(backend: ResultBackend, task_id: str) -> bool:
    give_up = time.monotonic() + PATIENCE
    while time.monotonic() < give_up:
        if backend.get(task_id) is None:
            return True
        time.sleep(0.05)
    return False


# -- round trips ----------------------------------------------------------------------------
def test_success_document_round_trips(backend: ResultBackend) -> None:
    task_id = new_id()
    result = {
        "text": "héllo ✓ 日本語",
        "nested": [1, 2.5, None, {"deeper": [True, False, "ünï"]}],
        "when": datetime(2026, 11, 23, 18, 57, 15, 790250, tzinfo=UTC),
        "nothing": None,
    }
    meta = success(task_id, result)
    backend.store(task_id, meta)
    assert backend.get(task_id) == meta


def test_none_result_round_trips(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, success(task_id, None))
    got = backend.get(task_id)
    assert got is not None
    assert got["status"] == states.SUCCESS
    assert got["result"] is None


def test_document_keeps_celery_field_order(backend: ResultBackend) -> None:
    task_id = new_id()
    request = {
        "task": "proj.add",
        "args": [2, 3],
        "kwargs": {"z": "ż"},
        "hostname": "w1@host",
        "retries": 1,
        "delivery_info": {"routing_key": "celery"},
        "group": "g-1",
        "parent_id": "p-1",
    }
    meta = build_meta(task_id, states.SUCCESS, 5, request=request, extended=True)
    backend.store(task_id, meta)
    got = backend.get(task_id)
    assert got == meta
    assert list(got) == list(meta)


def test_failure_document_round_trips_the_exception(backend: ResultBackend) -> None:
    task_id = new_id()
    meta = build_meta(
        task_id, states.FAILURE, ValueError("boom ✗"), traceback="Traceback (most recent...)"
    )
    backend.store(task_id, meta)
    got = backend.get(task_id)
    assert got == meta
    assert got["result"] == {
        "exc_type": "ValueError",
        "exc_message": ["boom ✗"],
        "exc_module": "builtins",
    }
    exc = decode_exception(got["result"])
    assert type(exc) is ValueError
    assert exc.args == ("boom ✗",)


def test_started_document_round_trips(backend: ResultBackend) -> None:
    task_id = new_id()
    meta = build_meta(task_id, states.STARTED, {"pid": 4242, "hostname": "w1@host"})
    backend.store(task_id, meta)
    got = backend.get(task_id)
    assert got == meta
    assert got["date_done"] is None


def test_retry_document_round_trips(backend: ResultBackend) -> None:
    task_id = new_id()
    reason = errors.Retry("again", ConnectionError("refused"), 5)
    meta = build_meta(task_id, states.RETRY, reason, traceback="Traceback ...")
    backend.store(task_id, meta)
    got = backend.get(task_id)
    assert got == meta
    assert got["result"]["exc_type"] == "Retry"
    assert got["result"]["exc_module"] == "celery.exceptions"


def test_unknown_id_reads_as_none(backend: ResultBackend) -> None:
    assert backend.get(new_id()) is None


def test_get_many_returns_only_known_ids(backend: ResultBackend) -> None:
    known = [new_id() for _ in range(3)]
    for index, task_id in enumerate(known):
        backend.store(task_id, success(task_id, index))
    unknown = new_id()
    found = backend.get_many([*known, unknown])
    assert set(found) == set(known)
    assert [found[task_id]["result"] for task_id in known] == [0, 1, 2]
    assert backend.get_many([]) == {}


def test_get_many_handles_more_ids_than_one_query_binds(backend: ResultBackend) -> None:
    task_ids = [new_id() for _ in range(1200)]
    for task_id in task_ids[::100]:
        backend.store(task_id, success(task_id))
    assert set(backend.get_many(task_ids)) == set(task_ids[::100])


def test_backends_made_for_one_url_share_results(make_backend: MakeBackend) -> None:
    producer, worker = make_backend(), make_backend()
    task_id = new_id()
    worker.store(task_id, success(task_id, "shared"))
    got = producer.get(task_id)
    assert got is not None
    assert got["result"] == "shared"


def test_stores_from_many_threads_all_land(backend: ResultBackend) -> None:
    task_ids = [new_id() for _ in range(40)]

    def store_all(ids: list[str]) -> None:
        for task_id in ids:
            backend.store(task_id, success(task_id, task_id))

    threads = [threading.Thread(target=store_all, args=(task_ids[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = backend.get_many(task_ids)
    assert {task_id: meta["result"] for task_id, meta in found.items()} == {
        task_id: task_id for task_id in task_ids
    }


# -- which states replace which -------------------------------------------------------------
@pytest.mark.parametrize(
    ("state", "result"),
    [
        (states.FAILURE, ValueError("late duplicate")),
        (states.RETRY, errors.Retry("again")),
        (states.STARTED, {"pid": 1, "hostname": "w@h"}),
        (states.REVOKED, errors.TaskRevokedError("revoked")),
    ],
)
def test_success_is_never_replaced(backend: ResultBackend, state: str, result: Any) -> None:
    task_id = new_id()
    backend.store(task_id, success(task_id, "first"))
    backend.store(task_id, build_meta(task_id, state, result))
    got = backend.get(task_id)
    assert got is not None
    assert got["status"] == states.SUCCESS
    assert got["result"] == "first"


def test_first_success_wins_over_a_duplicate_success(backend: ResultBackend) -> None:
    # Celery's key-value backends skip every write once SUCCESS is stored.
    task_id = new_id()
    backend.store(task_id, success(task_id, "first"))
    backend.store(task_id, success(task_id, "second"))
    got = backend.get(task_id)
    assert got is not None
    assert (got["status"], got["result"]) == (states.SUCCESS, "first")


@pytest.mark.parametrize(
    ("first_state", "first_result"),
    [
        (states.FAILURE, ValueError("transient")),
        (states.RETRY, errors.Retry("again")),
        (states.STARTED, {"pid": 1, "hostname": "w@h"}),
    ],
)
def test_other_states_are_replaced(
    backend: ResultBackend, first_state: str, first_result: Any
) -> None:
    task_id = new_id()
    backend.store(task_id, build_meta(task_id, first_state, first_result))
    backend.store(task_id, success(task_id, "finally"))
    got = backend.get(task_id)
    assert got is not None
    assert (got["status"], got["result"]) == (states.SUCCESS, "finally")


def test_progress_states_replace_each_other(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w"}))
    backend.store(task_id, build_meta(task_id, states.RETRY, errors.Retry("again")))
    backend.store(task_id, build_meta(task_id, states.FAILURE, KeyError("gone")))
    got = backend.get(task_id)
    assert got is not None
    assert got["status"] == states.FAILURE


# -- forget, expiry, cleanup ----------------------------------------------------------------
def test_forget_removes_the_document(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, success(task_id))
    backend.forget(task_id)
    assert backend.get(task_id) is None
    backend.forget(task_id)  # forgetting twice is harmless
    backend.forget(new_id())


def test_forgotten_success_can_be_stored_again(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, success(task_id, "first"))
    backend.forget(task_id)
    backend.store(task_id, build_meta(task_id, states.FAILURE, ValueError("rerun")))
    got = backend.get(task_id)
    assert got is not None
    assert got["status"] == states.FAILURE


def test_expired_documents_read_as_missing_and_cleanup_deletes_them(
    make_backend: MakeBackend,
) -> None:
    # Long enough that the read right after storing finds the document on a loaded
    # machine (0.3 s was not, under a tracing interpreter).
    short, kept = make_backend(expires=1.0), make_backend(expires=None)
    keeper = new_id()
    kept.store(keeper, success(keeper))
    expiring = [new_id(), new_id()]
    for task_id in expiring:
        short.store(task_id, success(task_id))
    assert short.get(expiring[0]) is not None

    assert eventually_missing(short, expiring[0])
    # Stored a moment after the first, so it may expire a moment later.
    assert eventually_missing(kept, expiring[1])
    assert short.get_many([*expiring, keeper]).keys() == {keeper}
    # Where the server drops expired documents itself, cleanup finds none left.
    assert kept.cleanup() == (0 if getattr(kept, "expires_by_itself", False) else 2)
    assert kept.cleanup() == 0
    assert short.get(keeper) is not None


def test_expired_success_may_be_stored_again(make_backend: MakeBackend) -> None:
    short = make_backend(expires=0.3)
    task_id = new_id()
    short.store(task_id, success(task_id, "old"))
    assert eventually_missing(short, task_id)
    short.store(task_id, build_meta(task_id, states.FAILURE, ValueError("new run")))
    got = short.get(task_id)
    assert got is not None
    assert got["status"] == states.FAILURE


def test_zero_expires_keeps_documents_like_celery(make_backend: MakeBackend) -> None:
    backend = make_backend(expires=0)
    task_id = new_id()
    backend.store(task_id, success(task_id))
    assert backend.get(task_id) is not None
    assert backend.cleanup() == 0


# -- wait -----------------------------------------------------------------------------------
def test_wait_returns_a_stored_result_at_once(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, success(task_id, "ready"))
    assert backend.wait(task_id, timeout=PATIENCE)["result"] == "ready"


def test_wait_wakes_when_another_thread_stores(make_backend: MakeBackend) -> None:
    waiter, worker = make_backend(), make_backend()
    task_id = new_id()
    store_later(worker, 0.1, success(task_id, "done"))
    started = time.monotonic()
    meta = waiter.wait(task_id, timeout=PATIENCE)
    assert meta["result"] == "done"
    assert time.monotonic() - started < PROMPT


def test_wait_wakes_every_waiter(backend: ResultBackend) -> None:
    task_id = new_id()
    results: list[Any] = []

    def wait() -> None:
        results.append(backend.wait(task_id, timeout=PATIENCE)["result"])

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for thread in waiters:
        thread.start()
    store_later(backend, 0.1, success(task_id, "all"))
    for thread in waiters:
        thread.join(PATIENCE)
    assert results == ["all", "all", "all"]


def test_wait_raises_timeout_for_a_result_that_never_comes(backend: ResultBackend) -> None:
    started = time.monotonic()
    with pytest.raises(errors.TimeoutError):
        backend.wait(new_id(), timeout=0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < PATIENCE


def test_wait_timeout_is_also_the_builtin_timeout(backend: ResultBackend) -> None:
    with pytest.raises(TimeoutError):
        backend.wait(new_id(), timeout=0.05)


def test_wait_ignores_states_that_are_not_ready(backend: ResultBackend) -> None:
    task_id = new_id()
    store_later(
        backend,
        0.1,
        build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w@h"}),
        build_meta(task_id, states.RETRY, errors.Retry("again")),
        build_meta(task_id, states.FAILURE, ValueError("gave up")),
    )
    meta = backend.wait(task_id, timeout=PATIENCE)
    assert meta["status"] == states.FAILURE


def test_wait_times_out_while_only_started(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w"}))
    with pytest.raises(errors.TimeoutError):
        backend.wait(task_id, timeout=0.2)


def test_wait_returns_revoked(backend: ResultBackend) -> None:
    task_id = new_id()
    store_later(
        backend, 0.05, build_meta(task_id, states.REVOKED, errors.TaskRevokedError("revoked"))
    )
    meta = backend.wait(task_id, timeout=PATIENCE)
    assert meta["status"] == states.REVOKED
    assert isinstance(decode_exception(meta["result"]), errors.TaskRevokedError)


# -- atomic counters (optional) ------------------------------------------------------------
@pytest.fixture
def counting(backend: ResultBackend) -> ResultBackend:
    if not backend.supports_counters:
        pytest.skip(f"{type(backend).__name__} has no atomic counters")
    return backend


def test_counter_adds_and_returns_the_new_value(counting: ResultBackend) -> None:
    key = f"chord-{new_id()}"
    assert counting.incr(key) == 1
    assert counting.incr(key) == 2
    assert counting.incr(key, 5) == 7
    assert counting.incr(f"chord-{new_id()}") == 1


def test_deleted_counter_starts_again(counting: ResultBackend) -> None:
    key = f"chord-{new_id()}"
    counting.incr(key, 3)
    counting.delete_counter(key)
    assert counting.incr(key) == 1
    counting.delete_counter(f"chord-{new_id()}")  # deleting an unknown counter is harmless


def test_counters_do_not_touch_results(counting: ResultBackend) -> None:
    task_id = new_id()
    counting.store(task_id, success(task_id, "kept"))
    counting.incr(task_id)
    counting.delete_counter(task_id)
    got = counting.get(task_id)
    assert got is not None
    assert got["result"] == "kept"


def test_counter_counts_every_increment_from_many_threads(
    make_backend: MakeBackend, counting: ResultBackend
) -> None:
    key = f"chord-{new_id()}"
    seen: list[int] = []
    seen_lock = threading.Lock()

    def count(backend: ResultBackend) -> None:
        for _ in range(25):
            value = backend.incr(key)
            with seen_lock:
                seen.append(value)

    # Separate backends too, so SQLite counts across connections, not just threads.
    threads = [
        threading.Thread(target=count, args=(counting if i % 2 else make_backend(),))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
    assert sorted(seen) == list(range(1, 101))


def test_expired_counter_starts_again(counting: ResultBackend) -> None:
    key = f"chord-{new_id()}"
    counting.incr(key, 10, expires=0.3)
    # Any read would be an incr, which refreshes the expiry. Memcached counts whole seconds.
    time.sleep(0.6 + 2 * getattr(counting, "expiry_resolution", 0.0))
    assert counting.incr(key) == 1


def test_counter_refreshes_its_expiry(counting: ResultBackend) -> None:
    key = f"chord-{new_id()}"
    counting.incr(key, expires=0.3)
    assert counting.incr(key, expires=None) == 2
    time.sleep(0.5)
    assert counting.incr(key) == 3


# -- serializers ----------------------------------------------------------------------------
def test_pickled_documents_are_refused_unless_pickle_is_accepted(
    make_backend: MakeBackend,
) -> None:
    writer = make_backend(serializer="pickle", accept=["pickle", "json"])
    task_id = new_id()
    meta = success(task_id, {"set": {1, 2}})
    writer.store(task_id, meta)
    assert writer.get(task_id) == meta
    with pytest.raises(errors.ContentDisallowed):
        make_backend().get(task_id)


def test_reader_decodes_with_the_stored_serializer(make_backend: MakeBackend) -> None:
    writer = make_backend()
    reader = make_backend(serializer="pickle", accept=["pickle", "json"])
    task_id = new_id()
    writer.store(task_id, success(task_id, "json on disk"))
    got = reader.get(task_id)
    assert got is not None
    assert got["result"] == "json on disk"


def test_an_unserializable_result_fails_at_store(backend: ResultBackend) -> None:
    task_id = new_id()
    with pytest.raises(errors.EncodeError):
        backend.store(task_id, success(task_id, object()))
    assert backend.get(task_id) is None


def test_check_and_context_manager(make_backend: MakeBackend) -> None:
    with make_backend() as backend:
        backend.check()
        task_id = new_id()
        backend.store(task_id, success(task_id))


# -- memory only ----------------------------------------------------------------------------
def test_memory_reset_all_empties_existing_stores() -> None:
    url = f"memory://reset-{uuid.uuid4()}"
    before = MemoryBackend(url)
    task_id = new_id()
    before.store(task_id, success(task_id))
    MemoryBackend.reset_all()
    after = MemoryBackend(url)
    assert before.get(task_id) is None
    after.store(task_id, success(task_id, "again"))
    assert before.get(task_id) is not None


def test_memory_stores_are_separate_per_url() -> None:
    one, other = (
        MemoryBackend(f"memory://{uuid.uuid4()}"),
        MemoryBackend(f"memory://{uuid.uuid4()}"),
    )
    task_id = new_id()
    one.store(task_id, success(task_id))
    assert other.get(task_id) is None


def test_memory_readers_get_their_own_copy() -> None:
    backend = MemoryBackend(f"memory://{uuid.uuid4()}")
    task_id = new_id()
    meta = success(task_id, {"items": [1]})
    backend.store(task_id, meta)
    meta["result"]["items"].append(2)
    first = backend.get(task_id)
    assert first is not None
    first["result"]["items"].append(3)
    again = backend.get(task_id)
    assert again is not None
    assert again["result"] == {"items": [1]}


# -- SQLite only ----------------------------------------------------------------------------
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def sqlite_backend(sqlite_url: str) -> Iterator[SqliteBackend]:
    backend = SqliteBackend(sqlite_url)
    yield backend
    backend.close()


STORE_FROM_ANOTHER_PROCESS = """
import sys, time
from conveyor import states
from conveyor.backends.meta import build_meta
from conveyor.backends.sqlite import SqliteBackend

url, task_id, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
with SqliteBackend(url) as backend:
    time.sleep(delay)
    backend.store(task_id, build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w"}))
    time.sleep(delay)
    backend.store(task_id, build_meta(task_id, states.SUCCESS, "from another process"))
"""


def test_sqlite_wait_sees_a_store_from_another_process(
    sqlite_url: str, sqlite_backend: SqliteBackend
) -> None:
    task_id = new_id()
    child = subprocess.Popen(
        [sys.executable, "-c", STORE_FROM_ANOTHER_PROCESS, sqlite_url, task_id, "0.2"]
    )
    try:
        meta = sqlite_backend.wait(task_id, timeout=PATIENCE)
    finally:
        assert child.wait(PATIENCE) == 0
    assert meta["result"] == "from another process"


def test_sqlite_results_survive_reopening(sqlite_url: str) -> None:
    task_id = new_id()
    with SqliteBackend(sqlite_url) as first:
        first.store(task_id, success(task_id, "durable"))
    with SqliteBackend(sqlite_url) as second:
        got = second.get(task_id)
    assert got is not None
    assert got["result"] == "durable"


def test_sqlite_uses_wal_and_its_own_table(sqlite_url: str, tmp_path: Path) -> None:
    # A broker's tables in the same file are left alone.
    path = tmp_path / "shared.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB)")
        connection.execute("INSERT INTO messages (body) VALUES (x'00')")
    connection.close()
    with SqliteBackend(sqlite_url) as backend:
        task_id = new_id()
        backend.store(task_id, success(task_id))
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert {"messages", sqlite_module.TABLE} <= tables
        assert connection.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    finally:
        connection.close()


def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert database_path("sqlite:///relative.db") == Path("relative.db")
    assert database_path("sqlite:////abs/dir/results.db") == Path("/abs/dir/results.db")
    monkeypatch.chdir(tmp_path)
    with SqliteBackend("sqlite:///nested/dirs/results.db") as backend:
        task_id = new_id()
        backend.store(task_id, success(task_id))
    assert (tmp_path / "nested" / "dirs" / "results.db").exists()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "redis://x"])
def test_sqlite_refuses_urls_without_a_file(url: str) -> None:
    with pytest.raises(errors.ConfigurationError):
        SqliteBackend(url)


def test_sqlite_retries_while_another_connection_holds_the_write_lock(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no busy timeout SQLite reports "database is locked" at once, so the store only
    # succeeds if the backend itself retries.
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", 0)
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        connection = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(PATIENCE)
            connection.execute("COMMIT")
        finally:
            connection.close()

    with SqliteBackend(sqlite_url) as backend:
        holder = threading.Thread(target=hold_lock)
        holder.start()
        assert locked.wait(PATIENCE)
        threading.Timer(0.3, release.set).start()
        task_id = new_id()
        backend.store(task_id, success(task_id, "after the lock"))
        holder.join(PATIENCE)
        got = backend.get(task_id)
    assert got is not None
    assert got["result"] == "after the lock"


def exit_code_of_fork(child: Callable[[], bool]) -> int:
    """Run ``child`` in a forked process; its exit code is 0 if it returned True."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process that has threads.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if child() else 1
        finally:
            os._exit(code)
    give_up = time.monotonic() + PATIENCE
    while time.monotonic() < give_up:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sqlite_forked_child_opens_its_own_connection(sqlite_backend: SqliteBackend) -> None:
    parent_id, child_id = new_id(), new_id()
    sqlite_backend.store(parent_id, success(parent_id, "parent"))  # opens a connection

    def child() -> bool:
        sqlite_backend.store(child_id, success(child_id, "child"))
        seen = sqlite_backend.get(parent_id)
        sqlite_backend.close()
        return seen is not None and seen["result"] == "parent"

    assert exit_code_of_fork(child) == 0
    got = sqlite_backend.get(child_id)
    assert got is not None
    assert got["result"] == "child"
    # The parent's connection still works after the child closed its own.
    sqlite_backend.store(parent_id, build_meta(parent_id, states.FAILURE, ValueError("x")))
    assert sqlite_backend.get(parent_id)["status"] == states.SUCCESS  # type: ignore[index]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sqlite_fork_while_another_thread_holds_the_wake_up_lock(
    sqlite_backend: SqliteBackend,
) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sqlite_backend._signal.changed:
            holding.set()
            release.wait(PATIENCE)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(PATIENCE)
    task_id = new_id()
    try:
        # store() notifies waiters; with the lock copied as held, the child would hang.
        code = exit_code_of_fork(lambda: sqlite_backend.store(task_id, success(task_id)) is None)
    finally:
        release.set()
        holder.join(PATIENCE)
    assert code == 0
    assert sqlite_backend.get(task_id) is not None


def test_sqlite_connection_of_a_finished_thread_is_closed(sqlite_backend: SqliteBackend) -> None:
    connections: list[sqlite3.Connection] = []

    def use() -> None:
        sqlite_backend.get(new_id())
        connections.append(sqlite_backend._connections.get())

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    del thread
    with pytest.raises(sqlite3.ProgrammingError):
        connections[0].execute("SELECT 1")
