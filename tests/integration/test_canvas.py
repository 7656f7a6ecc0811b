"""Workflows end to end on the memory and SQLite brokers and backends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, states, testing
from conveyor.canvas import Signature, chain, chord, group, signature
from conveyor.errors import ChordError
from conveyor.request import Request
from conveyor.result import AsyncResult, GroupResult

ERRBACK_CALLS: list[tuple[str | None, str]] = []


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Conveyor]:
    if request.param == "memory":
        instance = testing.memory_app("w")
    else:
        url = f"sqlite:///{tmp_path / 'c.db'}"
        instance = Conveyor("w", broker=url, backend=url)
    register(instance)
    ERRBACK_CALLS.clear()
    yield instance
    instance.close()


def register(app: Conveyor) -> None:
    @app.task(name="w.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="w.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="w.xsum")
    def xsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="w.fail")
    def fail(*args: Any) -> None:
        raise ValueError("broken step")

    @app.task(name="w.on_error_id")
    def on_error_id(task_id: str) -> str:
        ERRBACK_CALLS.append((task_id, "by id"))
        return task_id

    @app.task(name="w.on_error_full")
    def on_error_full(request: Request, exc: BaseException, traceback: str) -> None:
        ERRBACK_CALLS.append((request.id, f"{type(exc).__name__}: {exc}"))


def task(app: Conveyor, name: str) -> Any:
    return app.tasks[f"w.{name}"]


def run(app: Conveyor) -> None:
    testing.run_until_idle(app, timeout=30)


def test_signature_dict_form_travels_as_celery_writes_it(app: Conveyor) -> None:
    add = task(app, "add")
    callback = add.si(10, 10).set(queue="celery")
    assert dict(callback) == {"task": "w.add", "args": [10, 10], "kwargs": {},
                              "options": {"queue": "celery"}, "subtask_type": None,
                              "immutable": True}
    add.apply_async((1, 1), link=add.s(5))
    delivery = app.broker.fetch(["celery"], 1, 1.0)[0]
    body = json.loads(delivery.envelope.body)
    assert body[2]["callbacks"] == [{"task": "w.add", "args": [5], "kwargs": {},
                                     "options": {}, "subtask_type": None,
                                     "immutable": False}]
    assert body[2]["errbacks"] is None
    app.broker.reject(delivery, requeue=True)


def test_link_callbacks_get_the_result_unless_immutable(app: Conveyor) -> None:
    add = task(app, "add")
    first = add.apply_async((2, 2), link=[add.s(1).set(task_id="cb-mutable"),
                                          add.si(100, 1).set(task_id="cb-immutable")])
    run(app)
    assert first.get(timeout=5) == 4
    assert app.AsyncResult("cb-mutable").get(timeout=5) == 5
    assert app.AsyncResult("cb-immutable").get(timeout=5) == 101
    meta = app.backend.get("cb-mutable") if app.backend else None
    assert meta is not None
    assert meta["parent_id"] == first.id


def test_errbacks_old_and_new_style(app: Conveyor) -> None:
    fail = task(app, "fail")
    result = fail.apply_async((), link_error=[task(app, "on_error_id").s(),
                                              task(app, "on_error_full").s()])
    run(app)
    with pytest.raises(ValueError, match="broken step"):
        result.get(timeout=5)
    assert sorted(ERRBACK_CALLS) == sorted([(result.id, "by id"),
                                            (result.id, "ValueError: broken step")])


def test_chain_passes_results_and_walks_back(app: Conveyor) -> None:
    add, mul = task(app, "add"), task(app, "mul")
    result = (add.s(1, 2) | add.s(3) | mul.s(10)).apply_async()
    run(app)
    assert result.get(timeout=5) == 60
    assert isinstance(result, AsyncResult)
    assert result.parent is not None
    assert result.parent.get(timeout=5) == 6
    assert result.parent.parent.get(timeout=5) == 3  # type: ignore[union-attr]


def test_failing_chain_step_fails_every_later_step(app: Conveyor) -> None:
    add, fail = task(app, "add"), task(app, "fail")
    result = chain(add.s(1, 1), fail.s(), add.s(1), add.s(2)).apply_async()
    run(app)
    with pytest.raises(ValueError, match="broken step"):
        result.get(timeout=5)
    assert isinstance(result, AsyncResult)
    assert result.parent is not None
    assert result.parent.state == states.FAILURE


def test_group_result(app: Conveyor) -> None:
    add = task(app, "add")
    result = group(add.s(i, i) for i in range(6)).apply_async()
    assert isinstance(result, GroupResult)
    run(app)
    assert result.get(timeout=5) == [0, 2, 4, 6, 8, 10]
    assert result.ready()
    assert result.successful()
    assert result.completed_count() == 6
    result.save()
    restored = GroupResult.restore(result.id, app)
    assert restored is not None
    assert [r.id for r in restored] == [r.id for r in result]
    assert restored.get(timeout=5) == [0, 2, 4, 6, 8, 10]


def test_chord_runs_the_body_once_with_ordered_results(app: Conveyor) -> None:
    add, xsum = task(app, "add"), task(app, "xsum")
    result = chord([add.s(i, 0) for i in range(10)], xsum.s()).apply_async()
    run(app)
    assert result.get(timeout=5) == sum(range(10))
    assert isinstance(result.parent, GroupResult)
    assert result.parent.get(timeout=5) == list(range(10))


def test_chord_call_form_and_empty_header(app: Conveyor) -> None:
    add, xsum = task(app, "add"), task(app, "xsum")
    result = chord(add.s(i, i) for i in range(3))(xsum.s())
    empty = chord([], xsum.s()).apply_async()
    run(app)
    assert result.get(timeout=5) == 6
    assert empty.get(timeout=5) == 0


def test_failing_header_part_fails_the_chord_and_calls_errbacks(app: Conveyor) -> None:
    add, xsum, fail = task(app, "add"), task(app, "xsum"), task(app, "fail")
    body = xsum.s()
    body.link_error(task(app, "on_error_id").s())
    result = chord([add.s(1, 1), fail.s(), add.s(2, 2)], body).apply_async()
    run(app)
    with pytest.raises(ChordError, match="broken step"):
        result.get(timeout=5)
    assert (result.id, "by id") in ERRBACK_CALLS


def test_map_starmap_and_chunks(app: Conveyor) -> None:
    add = task(app, "add")
    double = app.task(name="w.double")(lambda x: 2 * x)
    mapped = double.map([1, 2, 3]).apply_async()
    starred = add.starmap([(1, 2), (3, 4)]).apply_async()
    chunked = add.chunks([(i, i) for i in range(7)], 3).apply_async()
    run(app)
    assert mapped.get(timeout=5) == [2, 4, 6]
    assert starred.get(timeout=5) == [3, 7]
    assert chunked.get(timeout=5) == [[0, 2, 4], [6, 8, 10], [12]]


def test_group_inside_a_chain_becomes_a_chord(app: Conveyor) -> None:
    add, xsum = task(app, "add"), task(app, "xsum")
    result = (add.s(1, 1) | group(add.s(10), add.s(20)) | xsum.s()).apply_async()
    run(app)
    assert result.get(timeout=5) == (2 + 10) + (2 + 20)


def test_nested_chain_in_group_in_chord(app: Conveyor) -> None:
    add, mul, xsum = task(app, "add"), task(app, "mul"), task(app, "xsum")
    header = [
        chain(add.s(1, 1), mul.s(10)),                        # 20
        group(add.s(1, 2), chain(add.s(2, 2), mul.s(2))),     # [3, 8] -> a list result
        add.s(5, 5),                                          # 10
    ]
    flat = chord([header[0], header[2]], xsum.s()).apply_async()
    nested = chord([chain(add.s(1, 1), mul.s(10)),
                    chord([add.s(1, 2), add.s(3, 4)], xsum.s())], xsum.s()).apply_async()
    inner_group = group(header[1]).apply_async()
    run(app)
    assert flat.get(timeout=5) == 30
    assert nested.get(timeout=5) == 20 + 10
    assert inner_group.get(timeout=5) == [3, 8]


def test_celery_style_chord_unlock_finishes_a_chord(app: Conveyor) -> None:
    add, xsum = task(app, "add"), task(app, "xsum")
    parts = [add.apply_async((i, i)) for i in range(3)]
    body = xsum.s().set(task_id="unlock-body")
    app.send_task("celery.chord_unlock", ("gid-unlock", dict(body)), {
        "interval": 0.05, "result": [[[p.id, None], None] for p in parts]})
    run(app)
    assert app.AsyncResult("unlock-body").get(timeout=5) == 0 + 2 + 4


def test_signature_from_a_message_dict(app: Conveyor) -> None:
    wire = {"task": "w.add", "args": [1], "kwargs": {}, "options": {},
            "subtask_type": None, "immutable": False}
    sig = signature(wire, app)
    assert isinstance(sig, Signature)
    assert sig(2) == 3
    result = sig.delay(41)
    run(app)
    assert result.get(timeout=5) == 42


def test_an_expired_header_part_fails_the_chord_instead_of_hanging(app: Conveyor) -> None:
    from datetime import UTC, datetime, timedelta

    add, xsum = task(app, "add"), task(app, "xsum")
    expired = add.s(1, 1).set(expires=datetime.now(UTC) - timedelta(seconds=1))
    result = chord([add.s(2, 2), expired], xsum.s()).apply_async()
    run(app)
    with pytest.raises(ChordError, match="TaskRevokedError"):
        result.get(timeout=5)
