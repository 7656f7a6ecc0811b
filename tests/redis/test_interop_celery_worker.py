"""A Conveyor producer sends; a real Celery worker runs; Conveyor's ``AsyncResult`` reads.

One Celery worker process serves the whole module (starting one takes seconds); each test
sends its own tasks and waits for its own results.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import REDIS_URL, require_service
from tests.redis.conftest import ProcessWorker, start_celery_worker
from tests.redis.interop_errors import InteropError
from tests.redis.interop_settings import interop_env
from tests.redis.scratch import delete_prefixed, scratch_prefix

from conveyor import Conveyor
from conveyor.errors import TaskRevokedError

TIMEOUT = 20


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    require_service("Redis", "127.0.0.1", 6379)
    prefix = scratch_prefix("celery-worker-")
    values = interop_env(REDIS_URL, prefix)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield {**os.environ, **values}
    delete_prefixed(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def celery_worker(
    module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessWorker]:
    worker = start_celery_worker(module_env, tmp_path_factory.mktemp("celery") / "w.log")
    yield worker
    assert worker.stop() == 0, worker.text()


@pytest.fixture
def producer(module_env: dict[str, str]) -> Iterator[Conveyor]:
    from tests.redis.conveyor_app import make_app

    app = make_app()
    yield app
    app.close()


def test_arguments_of_every_shape_round_trip(producer: Conveyor, celery_worker: Any) -> None:
    nested = {"ünï": ["ćödé", {"deep": [1, 2.5, None, True]}], "emoji": "🚀"}
    result = producer.send_task(
        "interop.echo",
        ("héllo", None, 0.1, 1e-300, nested),
        {"z": "日本語", "none": None, "pi": 3.141592653589793},
    )
    assert result.get(timeout=TIMEOUT) == {
        "args": ["héllo", None, 0.1, 1e-300, nested],
        "kwargs": {"z": "日本語", "none": None, "pi": 3.141592653589793},
    }
    meta = producer.backend.get(result.id) if producer.backend else None
    assert meta is not None
    assert meta["name"] == "interop.echo"  # result_extended, written by Celery
    assert meta["worker"].startswith("celery-")


def test_a_one_megabyte_payload(producer: Conveyor, celery_worker: Any) -> None:
    text = "ü" * (512 * 1024)  # 1 MiB of UTF-8
    assert producer.send_task("interop.length", (text,)).get(timeout=TIMEOUT) == len(text)


def test_countdown_and_eta_wait_for_their_time(producer: Conveyor, celery_worker: Any) -> None:
    sent = datetime.now(UTC)
    later = producer.send_task("interop.add", (1, 2), countdown=1)
    at = producer.send_task("interop.add", (3, 4), eta=sent + timedelta(seconds=1))
    assert later.get(timeout=TIMEOUT) == 3
    assert at.get(timeout=TIMEOUT) == 7
    for result in (later, at):
        assert result.date_done is not None
        assert datetime.fromisoformat(result.date_done) >= sent + timedelta(seconds=0.9)


def test_expired_task_is_revoked_not_run(producer: Conveyor, celery_worker: Any) -> None:
    result = producer.send_task(
        "interop.add", (1, 1), expires=datetime.now(UTC) - timedelta(seconds=5)
    )
    with pytest.raises(TaskRevokedError):
        result.get(timeout=TIMEOUT)
    assert result.state == "REVOKED"


@pytest.mark.parametrize(
    ("kind", "exc_type", "args"),
    [
        ("value", ValueError, ("boom ✗",)),
        ("custom", InteropError, ("custom", 42)),
    ],
)
def test_failure_keeps_type_message_and_module(
    producer: Conveyor,
    celery_worker: Any,
    kind: str,
    exc_type: type[Exception],
    args: tuple[Any, ...],
) -> None:
    result = producer.send_task("interop.fail", (kind,))
    with pytest.raises(exc_type) as raised:
        result.get(timeout=TIMEOUT)
    assert type(raised.value) is exc_type
    assert raised.value.args == args
    meta = producer.backend.get(result.id) if producer.backend else None
    assert meta is not None
    assert meta["result"]["exc_module"] == exc_type.__module__
    assert "Traceback" in (result.traceback or "")


def test_a_retrying_task_runs_again(producer: Conveyor, celery_worker: Any) -> None:
    assert producer.send_task("interop.retry_once").get(timeout=TIMEOUT) == "retried 1"


def test_link_and_link_error_callbacks(producer: Conveyor, celery_worker: Any) -> None:
    add, fail = producer.tasks["interop.add"], producer.tasks["interop.fail"]
    errback = producer.tasks["interop.errback"]
    callback_id, errback_id = f"cb-{uuid.uuid4()}", f"eb-{uuid.uuid4()}"
    ok = add.apply_async((2, 3), link=add.s(10).set(task_id=callback_id))
    failing = fail.apply_async(("value",), link_error=errback.s().set(task_id=errback_id))
    assert ok.get(timeout=TIMEOUT) == 5
    assert producer.AsyncResult(callback_id).get(timeout=TIMEOUT) == 15
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=TIMEOUT)
    assert producer.AsyncResult(errback_id).get(timeout=TIMEOUT) == f"errback for {failing.id}"


def test_priorities_reach_celery_in_its_order(
    producer: Conveyor, tmp_path: Path, module_env: dict[str, str]
) -> None:
    # Its own queue and its own worker, started once everything is queued.
    log = tmp_path / "order.log"
    sent = [(9, 0), (0, 1), (6, 2), (3, 3), (0, 4), (5, 5), (9, 6)]
    results = [
        producer.send_task("interop.record", (str(log), n), priority=p, queue="prio")
        for p, n in sent
    ]
    worker = start_celery_worker(module_env, tmp_path / "w.log", "-Q", "prio")
    try:
        for result in results:
            result.get(timeout=TIMEOUT)
    finally:
        worker.stop()
    ran = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert ran == [1, 4, 3, 5, 2, 0, 6]


def test_conveyor_workflows_run_on_celery_workers(producer: Conveyor, celery_worker: Any) -> None:
    from conveyor.canvas import Signature, chain, chord, group

    def sig(name: str, *args: Any) -> Signature:
        return Signature(name, args, app=producer)

    chained = chain(sig("interop.add", 1, 2), sig("interop.add", 3),
                    sig("interop.add", 10)).apply_async()
    assert chained.get(timeout=TIMEOUT) == 16
    grouped = group(sig("interop.add", i, i) for i in range(5)).apply_async()
    assert grouped.get(timeout=TIMEOUT) == [0, 2, 4, 6, 8]
    # We set the chord size in Celery's keys; Celery's worker counts the parts.
    chorded = chord([sig("interop.add", i, i) for i in range(10)], sig("interop.xsum"))()
    assert chorded.get(timeout=TIMEOUT) == 90
