"""A real Celery producer sends over RabbitMQ; a Conveyor worker runs; Celery's
``AsyncResult`` reads the result from its rpc:// reply queue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.interop_errors import InteropError
from tests.amqp.interop_settings import PRIORITY_QUEUE

from conveyor import Conveyor, testing
from conveyor.worker.worker import Worker

TIMEOUT = 20


@pytest.fixture
def worker(conveyor_app: Conveyor) -> Iterator[Worker]:
    with testing.running_worker(conveyor_app, ["celery"], pool="threads", concurrency=2) as running:
        yield running


def test_arguments_of_every_shape_round_trip(celery_client: Any, worker: Worker) -> None:
    nested = {"ünï": ["ćödé", {"deep": [1, 2.5, None, True]}], "emoji": "🚀"}
    result = celery_client.send_task(
        "interop.echo",
        args=("héllo", None, 0.1, 1e-300, nested),
        kwargs={"z": "日本語", "none": None, "pi": 3.141592653589793},
    )
    assert result.get(timeout=TIMEOUT) == {
        "args": ["héllo", None, 0.1, 1e-300, nested],
        "kwargs": {"z": "日本語", "none": None, "pi": 3.141592653589793},
    }
    assert result.status == "SUCCESS"


def test_a_one_megabyte_payload(celery_client: Any, worker: Worker) -> None:
    text = "x" * (1024 * 1024)
    assert celery_client.send_task("interop.length", args=(text,)).get(timeout=TIMEOUT) == len(text)


def test_countdown_and_eta_wait_for_their_time(celery_client: Any, worker: Worker) -> None:
    # Celery puts eta messages straight in the queue; the worker hands them to RabbitMQ's
    # delay chain instead of holding them unacknowledged.
    sent = datetime.now(UTC)
    later = celery_client.send_task("interop.add", args=(1, 2), countdown=1)
    at = celery_client.send_task("interop.add", args=(3, 4), eta=sent + timedelta(seconds=1))
    assert later.get(timeout=TIMEOUT) == 3
    assert at.get(timeout=TIMEOUT) == 7
    assert later.date_done >= sent + timedelta(seconds=0.9)
    assert at.date_done >= sent + timedelta(seconds=0.9)


def test_a_task_expiring_while_it_waits_is_revoked_not_run(
    celery_client: Any, worker: Worker
) -> None:
    # (An already expired message may also vanish in RabbitMQ: Celery sets a per-message
    # TTL. Expiring while it waits for its eta always reaches the worker.)
    from celery.exceptions import TaskRevokedError

    result = celery_client.send_task("interop.add", args=(1, 1), countdown=1.5, expires=0.5)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=TIMEOUT)
    assert result.status == "REVOKED"


@pytest.mark.parametrize(
    ("kind", "exc_type", "args"),
    [
        ("value", ValueError, ("boom ✗",)),
        ("custom", InteropError, ("custom", 42)),
    ],
)
def test_failure_keeps_type_message_and_module(
    celery_client: Any,
    worker: Worker,
    kind: str,
    exc_type: type[Exception],
    args: tuple[Any, ...],
) -> None:
    result = celery_client.send_task("interop.fail", args=(kind,))
    with pytest.raises(exc_type) as raised:
        result.get(timeout=TIMEOUT)
    assert type(raised.value) is exc_type
    assert raised.value.args == args
    assert result.status == "FAILURE"
    assert "Traceback" in result.traceback


def test_a_retrying_task_runs_again(celery_client: Any, worker: Worker) -> None:
    result = celery_client.send_task("interop.retry_once")
    assert result.get(timeout=TIMEOUT) == "retried 1"


def test_link_and_link_error_callbacks(celery_client: Any, worker: Worker, tmp_path: Path) -> None:
    # rpc:// results go to the sender's queue only, and the worker sends the callbacks:
    # they show themselves through files.
    log = tmp_path / "callbacks.log"
    ok = celery_client.send_task(
        "interop.add",
        args=(2, 3),
        link=celery_client.signature("interop.note", args=(str(log),)),
    )
    failing = celery_client.send_task(
        "interop.fail",
        args=("value",),
        link_error=celery_client.signature("interop.errback"),
    )
    assert ok.get(timeout=TIMEOUT) == 5
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=TIMEOUT)
    errbacks = tmp_path / "errbacks.log"
    wait_for(lambda: log.exists() and errbacks.exists())
    assert log.read_text() == "5 conveyor\n"
    assert errbacks.read_text() == f"errback {failing.id} conveyor\n"


def test_priorities_are_served_highest_first(
    celery_client: Any, conveyor_app: Conveyor, tmp_path: Path
) -> None:
    # Queued before any worker runs, on a queue with x-max-priority: RabbitMQ's order.
    log = tmp_path / "order.log"
    conveyor_app.broker.declare_queue(conveyor_app.router.queue(PRIORITY_QUEUE))
    sent = [(0, 0), (9, 1), (5, 2), (9, 3), (1, 4), (5, 5)]
    results = [
        celery_client.send_task(
            "interop.record", args=(str(log), n), priority=p, queue=PRIORITY_QUEUE
        )
        for p, n in sent
    ]
    with testing.running_worker(conveyor_app, [PRIORITY_QUEUE], pool="solo", concurrency=1):
        for result in results:
            result.get(timeout=TIMEOUT)
    ran = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert ran == [1, 3, 2, 5, 4, 0]


def test_a_task_id_of_the_callers_choice(celery_client: Any, worker: Worker) -> None:
    task_id = f"mine-{uuid.uuid4()}"
    assert (
        celery_client.send_task("interop.add", args=(1, 1), task_id=task_id).get(timeout=TIMEOUT)
        == 2
    )


def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
