"""A Conveyor producer sends over RabbitMQ; a real Celery worker runs; Conveyor's
``AsyncResult`` reads the result from its rpc:// reply queue.

One Celery worker process serves the whole module (starting one takes seconds); each test
sends its own tasks and waits for its own results.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.conftest import ProcessWorker, start_celery_worker
from tests.amqp.interop_errors import InteropError
from tests.amqp.interop_settings import PRIORITY_QUEUE, interop_env
from tests.amqp.vhosts import new_vhost, vhost_url

from conveyor import Conveyor
from conveyor.errors import TaskRevokedError

pytestmark = pytest.mark.slow

TIMEOUT = 20


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    values = interop_env(vhost_url(new_vhost()), str(tmp_path_factory.mktemp("records")))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield {**os.environ, **values}


@pytest.fixture(scope="module")
def celery_worker(
    module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessWorker]:
    worker = start_celery_worker(
        module_env, tmp_path_factory.mktemp("celery") / "w.log", "-Q", "celery"
    )
    yield worker
    assert worker.stop() == 0, worker.text()


@pytest.fixture
def producer(module_env: dict[str, str]) -> Iterator[Conveyor]:
    from tests.amqp.conveyor_app import make_app

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
    # Conveyor's producer delays in RabbitMQ (the TTL chain): the Celery worker receives
    # the message when it is due.
    sent = datetime.now(UTC)
    later = producer.send_task("interop.add", (1, 2), countdown=1)
    at = producer.send_task("interop.add", (3, 4), eta=sent + timedelta(seconds=1))
    assert later.get(timeout=TIMEOUT) == 3
    assert at.get(timeout=TIMEOUT) == 7
    for result in (later, at):
        assert result.date_done is not None
        assert datetime.fromisoformat(result.date_done) >= sent + timedelta(seconds=0.9)


def test_a_task_expiring_while_it_waits_is_revoked_not_run(
    producer: Conveyor, celery_worker: Any
) -> None:
    result = producer.send_task("interop.add", (1, 1), countdown=1.5, expires=0.5)
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


def test_link_and_link_error_callbacks(
    producer: Conveyor, celery_worker: Any, module_env: dict[str, str], tmp_path: Path
) -> None:
    add, fail = producer.tasks["interop.add"], producer.tasks["interop.fail"]
    note, errback = producer.tasks["interop.note"], producer.tasks["interop.errback"]
    log = tmp_path / "callbacks.log"
    ok = add.apply_async((2, 3), link=note.s(str(log)))
    failing = fail.apply_async(("value",), link_error=errback.s())
    assert ok.get(timeout=TIMEOUT) == 5
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=TIMEOUT)
    errbacks = Path(module_env["INTEROP_RECORD_DIR"]) / "errbacks.log"
    deadline = time.monotonic() + TIMEOUT
    while not (log.exists() and errbacks.exists() and failing.id in errbacks.read_text()):
        assert time.monotonic() < deadline, "callbacks did not run"
        time.sleep(0.02)
    assert log.read_text() == "5 celery\n"
    assert f"errback {failing.id} celery\n" in errbacks.read_text()


def test_priorities_reach_celery_in_rabbitmqs_order(
    producer: Conveyor, celery_worker: ProcessWorker, tmp_path: Path
) -> None:
    # Queued on a queue nobody consumes yet (x-max-priority, declared alike by both
    # apps), then the Celery worker is told to consume it: RabbitMQ's order, highest first.
    from celery import Celery
    from tests.amqp.celery_app import celery_settings

    log = tmp_path / "order.log"
    sent = [(0, 0), (9, 1), (5, 2), (9, 3), (1, 4), (5, 5)]
    results = [
        producer.send_task("interop.record", (str(log), n), priority=p, queue=PRIORITY_QUEUE)
        for p, n in sent
    ]
    control = Celery("interop-control", set_as_current=False)
    control.conf.update(celery_settings())
    try:
        control.control.add_consumer(
            PRIORITY_QUEUE, destination=[celery_worker.name], reply=True, timeout=10
        )
        for result in results:
            result.get(timeout=TIMEOUT)
        control.control.cancel_consumer(
            PRIORITY_QUEUE, destination=[celery_worker.name], reply=True, timeout=10
        )
    finally:
        control.close()
    ran = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert ran == [1, 3, 2, 5, 4, 0]
