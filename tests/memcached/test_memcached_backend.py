"""What the Memcached backend does beyond the shared contract: Celery's cache backend reads
and writes the same keys, lifetimes in memcached's terms, and bad input end to end."""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult as CeleryResult
from pymemcache.client.base import Client
from tests.memcached.service import HOST, PORT, require_memcached

from conveyor import Conveyor, states, testing
from conveyor.backends import backend_from_url
from conveyor.backends.memcached import (
    MAX_RELATIVE_EXPIRY,
    MemcachedBackend,
    memcached_expiry,
    servers_of,
    with_global_prefix,
)
from conveyor.backends.meta import build_meta, decode_exception
from conveyor.errors import BackendUnavailable, ConfigurationError, EncodeError

PATIENCE = 30.0

MakeBackend = Callable[..., MemcachedBackend]


class InteropError(Exception):
    """An exception class both sides can import."""


def new_id() -> str:
    return str(uuid.uuid4())


def success(task_id: str, result: Any = 42) -> dict[str, Any]:
    return build_meta(task_id, states.SUCCESS, result)


@pytest.fixture
def url() -> str:
    return require_memcached()


@pytest.fixture
def make_backend(url: str) -> Iterator[MakeBackend]:
    made: list[MemcachedBackend] = []

    def make(**options: Any) -> MemcachedBackend:
        backend = MemcachedBackend(url, **{"expires": 300, **options})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: MakeBackend) -> MemcachedBackend:
    return make_backend()


@pytest.fixture
def raw(url: str) -> Iterator[Client]:
    client = Client((HOST, PORT))
    yield client
    client.close()


# -- pure ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(None, 0), (0, 0), (0.2, 1), (1, 1), (10.5, 11), (86400, 86400)],
)
def test_lifetimes_in_whole_seconds(seconds: float | None, expected: int) -> None:
    assert memcached_expiry(seconds) == expected


def test_lifetimes_past_thirty_days_are_sent_as_unix_times() -> None:
    now = 1_900_000_000.0
    assert memcached_expiry(MAX_RELATIVE_EXPIRY, now) == MAX_RELATIVE_EXPIRY
    assert memcached_expiry(MAX_RELATIVE_EXPIRY + 1, now) == int(now) + MAX_RELATIVE_EXPIRY + 1


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("cache+memcached://127.0.0.1:11211/", [("127.0.0.1", 11211)]),
        ("cache+memcached://cache/", [("cache", 11211)]),
        ("cache+memcached://a:1;b:2/", [("a", 1), ("b", 2)]),
        ("cache+memcached://[::1]:11300/", [("::1", 11300)]),
    ],
)
def test_server_lists(url: str, servers: list[tuple[str, int]]) -> None:
    assert servers_of(url) == servers


@pytest.mark.parametrize("url", ["cache+memcached://", "memcached://h/", "cache+memcached://h:x/"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        servers_of(url)


def test_global_keyprefix_is_joined_as_celery_joins_it() -> None:
    assert with_global_prefix(None, "celery-task-meta-") == "celery-task-meta-"
    assert with_global_prefix("proj", "celery-task-meta-") == "proj_celery-task-meta-"
    assert with_global_prefix("proj:", "celery-task-meta-") == "proj:celery-task-meta-"


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        MemcachedBackend("cache+memcached://127.0.0.1:11211/", key_prefix="x")


def test_an_unreachable_server_is_reported() -> None:
    backend = backend_from_url("cache+memcached://127.0.0.1:1/")
    try:
        assert isinstance(backend, MemcachedBackend)
        with pytest.raises(BackendUnavailable):
            backend.check()
        with pytest.raises(BackendUnavailable):
            backend.get(new_id())
    finally:
        backend.close()


# -- against memcached -----------------------------------------------------------------------
def test_documents_live_under_celerys_key(backend: MemcachedBackend, raw: Client) -> None:
    task_id = new_id()
    backend.store(task_id, success(task_id, "value"))
    assert raw.get(f"celery-task-meta-{task_id}") is not None


def test_a_lifetime_past_thirty_days_keeps_the_document(make_backend: MakeBackend) -> None:
    # Sent as a plain number of seconds, memcached would read 40 days as a Unix time in
    # 1970 and drop the document at once.
    backend = make_backend(expires=40 * 86400)
    task_id = new_id()
    backend.store(task_id, success(task_id))
    time.sleep(1.1)
    assert backend.get(task_id) is not None
    backend.forget(task_id)


def test_counters_are_plain_memcached_counters(backend: MemcachedBackend, raw: Client) -> None:
    key = f"chord-unlock-{new_id()}"
    assert backend.incr(key, 2, expires=60) == 2
    assert raw.incr(key, 1) == 3  # what Celery's cache backend does to count chord parts
    assert backend.incr(key) == 4
    with pytest.raises(ValueError, match="count up"):
        backend.incr(key, -1)
    backend.delete_counter(key)


def test_a_document_over_the_item_size_is_refused_before_sending(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend(item_size_max=1000)
    task_id = new_id()
    with pytest.raises(EncodeError, match="item_size_max"):
        backend.store(task_id, success(task_id, "x" * 2000))
    assert backend.get(task_id) is None


def test_the_server_refusing_a_size_is_an_encode_error(make_backend: MakeBackend) -> None:
    # Told the limit is higher than the server's, the backend sends it and memcached says no.
    backend = make_backend(item_size_max=8 * 1024 * 1024)
    task_id = new_id()
    with pytest.raises(EncodeError, match="too large"):
        backend.store(task_id, success(task_id, "x" * 2 * 1024 * 1024))
    small = new_id()
    backend.store(small, success(small, "the connection still works"))
    assert backend.get(small) is not None


def test_key_prefixes_separate_applications(make_backend: MakeBackend, raw: Client) -> None:
    one, two = make_backend(global_keyprefix="one"), make_backend(global_keyprefix="two")
    task_id = new_id()
    one.store(task_id, success(task_id))
    assert two.get(task_id) is None
    assert raw.get(f"one_celery-task-meta-{task_id}") is not None


# -- Celery's cache backend ------------------------------------------------------------------
@pytest.fixture(params=[None, "proj"])
def prefix(request: pytest.FixtureRequest) -> str | None:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def celery_app(url: str, prefix: str | None) -> Iterator[Celery]:
    options = {"global_keyprefix": prefix} if prefix else {}
    app = Celery(
        "interop", broker="memory://", backend=url, result_backend_transport_options=options
    )
    yield app
    client = app.backend.__dict__.get("client")
    if client is not None:
        client.close()
    app.close()


@pytest.fixture
def shared(make_backend: MakeBackend, prefix: str | None) -> MemcachedBackend:
    return make_backend(global_keyprefix=prefix)


def test_celery_reads_what_conveyor_stored(celery_app: Celery, shared: MemcachedBackend) -> None:
    done, failed = new_id(), new_id()
    shared.store(done, success(done, {"sum": [1, 2]}))
    shared.store(
        failed, build_meta(failed, states.FAILURE, InteropError("custom", 42), traceback="TB")
    )
    assert CeleryResult(done, app=celery_app).get(timeout=PATIENCE) == {"sum": [1, 2]}
    result = CeleryResult(failed, app=celery_app)
    with pytest.raises(InteropError) as raised:
        result.get(timeout=PATIENCE)
    assert raised.value.args == ("custom", 42)
    assert result.traceback == "TB"


def test_conveyor_reads_what_celery_stored(celery_app: Celery, shared: MemcachedBackend) -> None:
    done, failed = new_id(), new_id()
    celery_app.backend.mark_as_done(done, [4, 2])
    celery_app.backend.mark_as_failure(failed, KeyError("gone"), traceback="TB")
    meta = shared.wait(done, timeout=PATIENCE)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, [4, 2])
    meta = shared.get(failed)
    assert meta is not None
    assert meta["status"] == states.FAILURE
    assert isinstance(decode_exception(meta["result"]), KeyError)


def test_success_is_final_whichever_side_stored_it(
    celery_app: Celery, shared: MemcachedBackend
) -> None:
    by_celery, by_conveyor = new_id(), new_id()
    celery_app.backend.mark_as_done(by_celery, "first")
    shared.store(by_celery, build_meta(by_celery, states.FAILURE, ValueError("late")))
    assert shared.get(by_celery)["result"] == "first"  # type: ignore[index]
    shared.store(by_conveyor, success(by_conveyor, "first"))
    celery_app.backend.mark_as_failure(by_conveyor, ValueError("late"))
    assert CeleryResult(by_conveyor, app=celery_app).get(timeout=PATIENCE) == "first"


# -- bad input, end to end -------------------------------------------------------------------
@pytest.fixture
def app(url: str) -> Iterator[Conveyor]:
    instance = Conveyor("bad", broker=f"memory://bad-{uuid.uuid4()}", backend=url)
    yield instance
    instance.close()


def test_results_that_cannot_be_stored_become_failures_that_say_why(app: Conveyor) -> None:
    @app.task(name="bad.opaque")
    def opaque() -> object:
        return object()

    @app.task(name="bad.huge")
    def huge() -> str:
        return "x" * 2 * 1024 * 1024

    @app.task(name="bad.fine")
    def fine() -> int:
        return 7

    with testing.running_worker(app, pool="threads"):
        with pytest.raises(EncodeError, match="could not be serialized"):
            opaque.delay().get(timeout=PATIENCE)
        result = huge.delay()
        with pytest.raises(EncodeError, match="item_size_max"):
            result.get(timeout=PATIENCE)
        assert result.state == states.FAILURE
        assert fine.delay().get(timeout=PATIENCE) == 7  # the worker kept going


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_connections_of_its_own(backend: MemcachedBackend) -> None:
    parent_id, child_id = new_id(), new_id()
    backend.store(parent_id, success(parent_id, "parent"))  # the pool now holds a socket
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            for _ in range(50):  # sharing the parent's socket would cross the replies
                backend.store(child_id, success(child_id, "child"))
                seen = backend.get(parent_id)
                if seen is None or seen["result"] != "parent":
                    break
            else:
                code = 0
        finally:
            os._exit(code)
    for _ in range(50):
        assert backend.get(parent_id)["result"] == "parent"  # type: ignore[index]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert backend.get(child_id)["result"] == "child"  # type: ignore[index]


def test_groups_saved_by_either_side_restore_on_the_other(
    celery_app: Celery, shared: MemcachedBackend
) -> None:
    from celery.result import GroupResult as CeleryGroup

    members = [new_id() for _ in range(3)]
    saved_by_celery = CeleryGroup(
        new_id(), [CeleryResult(m, app=celery_app) for m in members], app=celery_app
    )
    saved_by_celery.save()
    assert shared.get_group(saved_by_celery.id) == members

    group_id = new_id()
    shared.save_group(group_id, members)
    restored = CeleryGroup.restore(group_id, app=celery_app)
    assert restored is not None
    assert [result.id for result in restored.results] == members
    shared.forget_group(group_id)
    assert shared.get_group(group_id) is None


def test_a_chord_completes_through_the_counters(app: Conveyor) -> None:
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
