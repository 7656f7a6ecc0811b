"""Celery's own database backend and Conveyor's share rows, both ways, on every dialect.

The Celery side is the real ``celery`` package (its ``DatabaseBackend`` through
SQLAlchemy); no Celery worker is needed to store or read results.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.result import AsyncResult as CeleryResult
from tests.sql.conftest import MakeBackend
from tests.sql.databases import Scratch

from conveyor import Conveyor, states
from conveyor.backends.meta import build_meta, decode_exception
from conveyor.backends.sql import SqlBackend
from conveyor.errors import TaskRevokedError
from conveyor.result import AsyncResult

PATIENCE = 30.0


class InteropError(Exception):
    """An exception class both sides can import."""


@pytest.fixture
def celery_app(scratch: Scratch) -> Iterator[Celery]:
    app = Celery(
        "interop",
        broker="memory://",
        backend=scratch.url,
        result_extended=True,
        database_table_schemas=scratch.options.get("database_table_schemas", {}),
    )
    yield app
    app.close()


def new_id() -> str:
    return str(uuid.uuid4())


REQUEST = {
    "task": "proj.add",
    "args": [2, 3],
    "kwargs": {"z": "ż"},
    "hostname": "w1@host",
    "retries": 1,
    "delivery_info": {"routing_key": "celery"},
}


@pytest.mark.parametrize("first", ["celery", "conveyor"])
def test_either_side_may_create_the_tables(
    first: str, celery_app: Celery, make_backend: MakeBackend
) -> None:
    one, two = new_id(), new_id()
    if first == "celery":
        celery_app.backend.mark_as_done(one, "from celery")
        backend = make_backend()
        backend.store(two, build_meta(two, states.SUCCESS, "from conveyor"))
    else:
        backend = make_backend()
        backend.store(two, build_meta(two, states.SUCCESS, "from conveyor"))
        celery_app.backend.mark_as_done(one, "from celery")
    assert backend.get(one)["result"] == "from celery"  # type: ignore[index]
    assert CeleryResult(two, app=celery_app).get(timeout=PATIENCE) == "from conveyor"


def test_celery_reads_a_success_conveyor_stored(celery_app: Celery, backend: SqlBackend) -> None:
    task_id = new_id()
    result = {"text": "héllo ✓", "items": [1, 2.5, None], "flag": True}
    backend.store(
        task_id, build_meta(task_id, states.SUCCESS, result, request=REQUEST, extended=True)
    )
    got = CeleryResult(task_id, app=celery_app)
    assert got.get(timeout=PATIENCE) == result
    assert got.status == states.SUCCESS
    assert got.name == "proj.add"
    assert got.args == [2, 3]
    assert got.kwargs == {"z": "ż"}
    assert got.worker == "w1@host"
    assert got.queue == "celery"
    assert abs(got.date_done.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=5)


def test_celery_reads_a_failure_conveyor_stored(celery_app: Celery, backend: SqlBackend) -> None:
    task_id = new_id()
    backend.store(
        task_id,
        build_meta(
            task_id, states.FAILURE, InteropError("custom", 42), traceback="Traceback: boom"
        ),
    )
    got = CeleryResult(task_id, app=celery_app)
    with pytest.raises(InteropError) as raised:
        got.get(timeout=PATIENCE)
    assert raised.value.args == ("custom", 42)
    assert got.traceback == "Traceback: boom"


def test_celery_sees_progress_states_conveyor_stored(
    celery_app: Celery, backend: SqlBackend
) -> None:
    task_id = new_id()
    backend.store(task_id, build_meta(task_id, states.STARTED, {"pid": 7, "hostname": "w"}))
    got = CeleryResult(task_id, app=celery_app)
    assert got.status == states.STARTED
    assert got.info == {"pid": 7, "hostname": "w"}


def test_conveyor_reads_what_celery_stored(celery_app: Celery, backend: SqlBackend) -> None:
    done, failed, revoked = new_id(), new_id(), new_id()
    celery_app.backend.mark_as_done(done, {"answer": [4, 2]})
    celery_app.backend.mark_as_failure(failed, InteropError("bad", 1), traceback="TB text")
    celery_app.backend.mark_as_revoked(revoked, "revoked")

    meta = backend.get(done)
    assert meta is not None
    assert (meta["status"], meta["result"], meta["children"]) == (
        states.SUCCESS,
        {"answer": [4, 2]},
        [],
    )
    # Celery's naive UTC date_done comes back in the document's ISO form.
    date_done = datetime.fromisoformat(meta["date_done"])
    assert date_done.utcoffset() == timedelta(0)
    assert abs(date_done - datetime.now(UTC)) < timedelta(minutes=5)

    meta = backend.get(failed)
    assert meta is not None
    assert meta["status"] == states.FAILURE
    assert meta["traceback"] == "TB text"
    exc = decode_exception(meta["result"])
    assert type(exc) is InteropError
    assert exc.args == ("bad", 1)

    meta = backend.get(revoked)
    assert meta is not None
    assert meta["status"] == states.REVOKED
    assert isinstance(decode_exception(meta["result"]), TaskRevokedError)


def test_conveyor_reads_celery_extended_rows(celery_app: Celery, backend: SqlBackend) -> None:
    task_id = new_id()

    class Request:
        id = task_id
        task = "proj.mul"
        args = (3, 4)
        kwargs = {"k": 1}
        hostname = "celery@host"
        retries = 2
        delivery_info = {"routing_key": "maths"}
        group = None
        parent_id = None
        chord = None
        ignore_result = False
        stamps: dict[str, Any] = {}
        children: list[Any] = []

    celery_app.backend.store_result(task_id, 12, states.SUCCESS, request=Request())
    meta = backend.get(task_id)
    assert meta is not None
    assert meta["result"] == 12
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("proj.mul", [3, 4], {"k": 1})
    assert (meta["worker"], meta["retries"], meta["queue"]) == ("celery@host", 2, "maths")


def test_conveyor_result_api_reads_celery_results(celery_app: Celery, scratch: Scratch) -> None:
    app = Conveyor(
        "interop",
        broker="memory://interop",
        backend=scratch.url,
        result_backend_transport_options=scratch.options,
    )
    try:
        done, failed = new_id(), new_id()
        celery_app.backend.mark_as_done(done, 5)
        celery_app.backend.mark_as_failure(failed, KeyError("gone"))
        assert AsyncResult(done, app).get(timeout=PATIENCE) == 5
        with pytest.raises(KeyError):
            AsyncResult(failed, app).get(timeout=PATIENCE)
        assert AsyncResult(new_id(), app).state == states.PENDING
    finally:
        app.close()


def test_a_conveyor_waiter_sees_a_celery_store(celery_app: Celery, backend: SqlBackend) -> None:
    # Celery sends no NOTIFY: on PostgreSQL the waiter's slow look finds it.
    task_id = new_id()
    timer = threading.Timer(0.2, celery_app.backend.mark_as_done, (task_id, "late"))
    timer.start()
    try:
        assert backend.wait(task_id, timeout=PATIENCE)["result"] == "late"
    finally:
        timer.join()


def test_success_is_final_whichever_side_stored_it(celery_app: Celery, backend: SqlBackend) -> None:
    by_celery, by_conveyor = new_id(), new_id()
    celery_app.backend.mark_as_done(by_celery, "first")
    backend.store(by_celery, build_meta(by_celery, states.FAILURE, ValueError("late")))
    assert backend.get(by_celery)["result"] == "first"  # type: ignore[index]

    backend.store(by_conveyor, build_meta(by_conveyor, states.SUCCESS, "first"))
    celery_app.backend.mark_as_failure(by_conveyor, ValueError("late"))
    assert CeleryResult(by_conveyor, app=celery_app).get(timeout=PATIENCE) == "first"


def test_celery_replaces_a_conveyor_progress_state(celery_app: Celery, backend: SqlBackend) -> None:
    task_id = new_id()
    backend.store(task_id, build_meta(task_id, states.STARTED, {"pid": 1, "hostname": "w"}))
    celery_app.backend.mark_as_done(task_id, "done")
    meta = backend.get(task_id)
    assert meta is not None
    assert (meta["status"], meta["result"]) == (states.SUCCESS, "done")


def test_celery_forgets_and_cleans_up_conveyor_rows(
    celery_app: Celery, backend: SqlBackend, scratch: Scratch
) -> None:
    forgotten, old = new_id(), new_id()
    backend.store(forgotten, build_meta(forgotten, states.SUCCESS, 1))
    backend.store(old, build_meta(old, states.SUCCESS, 2))
    CeleryResult(forgotten, app=celery_app).forget()
    assert backend.get(forgotten) is None
    # Celery's cleanup deletes by date_done, a column Conveyor fills as Celery does.
    engine = scratch.admin_engine()
    try:
        with engine.begin() as connection:
            task = backend.tables.task
            connection.execute(
                task.update().where(task.c.task_id == old).values(date_done=datetime(2000, 1, 1))
            )
    finally:
        engine.dispose()
    celery_app.backend.cleanup()
    assert backend.get(old) is None


def test_the_tables_have_celerys_columns(celery_app: Celery, backend: SqlBackend) -> None:
    from celery.backends.database.models import TaskExtended, TaskSet

    backend.get(new_id())  # first use creates the tables
    celery_task = TaskExtended.__table__
    celery_group = TaskSet.__table__
    for ours, theirs in ((backend.tables.task, celery_task), (backend.tables.group, celery_group)):
        assert set(theirs.columns.keys()) <= set(ours.columns.keys())
        for column in theirs.columns:
            mine = ours.columns[column.name]
            assert mine.type._type_affinity is column.type._type_affinity, column.name
            assert mine.unique == column.unique, column.name
            assert bool(mine.index) == bool(column.index), column.name
    assert {"group_id", "parent_id", "expires_at"} == (
        set(backend.tables.task.columns.keys()) - set(celery_task.columns.keys())
    )
    assert backend.tables.task.name == "celery_taskmeta"
    assert backend.tables.group.name == "celery_tasksetmeta"
    inspector_engine = sa.create_engine(backend.sa_url)
    try:
        names = sa.inspect(inspector_engine).get_table_names(schema=backend.tables.task.schema)
    finally:
        inspector_engine.dispose()
    assert {"celery_taskmeta", "celery_tasksetmeta", "conveyor_counters"} <= set(names)


def test_groups_saved_by_either_side_restore_on_the_other(
    celery_app: Celery, backend: SqlBackend
) -> None:
    from celery.result import GroupResult as CeleryGroup

    members = [new_id() for _ in range(3)]
    saved_by_celery = CeleryGroup(
        new_id(), [CeleryResult(m, app=celery_app) for m in members], app=celery_app
    )
    saved_by_celery.save()
    assert backend.get_group(saved_by_celery.id) == members

    group_id = new_id()
    backend.save_group(group_id, members)
    backend.save_group(group_id, members[:2])  # saving again replaces
    restored = CeleryGroup.restore(group_id, app=celery_app)
    assert restored is not None
    assert [result.id for result in restored.results] == members[:2]
    backend.forget_group(group_id)
    assert backend.get_group(group_id) is None
    assert CeleryGroup.restore(group_id, app=celery_app) is None
