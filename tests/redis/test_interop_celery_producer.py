"""A real Celery producer sends; a Conveyor worker runs; Celery's ``AsyncResult`` reads."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.redis.interop_errors import InteropError

from conveyor import Conveyor, testing
from conveyor.worker.worker import Worker

TIMEOUT = 20


@pytest.fixture
def worker(conveyor_app: Conveyor) -> Iterator[Worker]:
    with testing.running_worker(conveyor_app, pool="threads", concurrency=2) as running:
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
    sent = datetime.now(UTC)
    later = celery_client.send_task("interop.add", args=(1, 2), countdown=1)
    at = celery_client.send_task("interop.add", args=(3, 4), eta=sent + timedelta(seconds=1))
    assert later.get(timeout=TIMEOUT) == 3
    assert at.get(timeout=TIMEOUT) == 7
    assert later.date_done >= sent + timedelta(seconds=0.9)
    assert at.date_done >= sent + timedelta(seconds=0.9)


def test_expired_task_is_revoked_not_run(celery_client: Any, worker: Worker) -> None:
    from celery.exceptions import TaskRevokedError

    result = celery_client.send_task(
        "interop.add", args=(1, 1), expires=datetime.now(UTC) - timedelta(seconds=5)
    )
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
    celery_client: Any, worker: Worker, kind: str, exc_type: type[Exception], args: tuple[Any, ...]
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


def test_link_and_link_error_callbacks(celery_client: Any, worker: Worker) -> None:
    callback_id, errback_id = f"cb-{uuid.uuid4()}", f"eb-{uuid.uuid4()}"
    ok = celery_client.send_task(
        "interop.add",
        args=(2, 3),
        link=celery_client.signature("interop.add", args=(10,)).set(task_id=callback_id),
    )
    failing = celery_client.send_task(
        "interop.fail",
        args=("value",),
        link_error=celery_client.signature("interop.errback").set(task_id=errback_id),
    )
    assert ok.get(timeout=TIMEOUT) == 5
    assert celery_client.AsyncResult(callback_id).get(timeout=TIMEOUT) == 15
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=TIMEOUT)
    assert celery_client.AsyncResult(errback_id).get(timeout=TIMEOUT) == f"errback for {failing.id}"


def test_priorities_are_served_in_celerys_redis_order(
    celery_client: Any, conveyor_app: Conveyor, tmp_path: Path
) -> None:
    # Sent before any worker runs, so the order of execution is the order of the queue:
    # on Redis Celery serves priority 0 first, then 3-5, 6-8, 9, FIFO within a step.
    log = tmp_path / "order.log"
    sent = [(9, 0), (0, 1), (6, 2), (3, 3), (0, 4), (5, 5), (9, 6)]
    results = [
        celery_client.send_task("interop.record", args=(str(log), n), priority=p) for p, n in sent
    ]
    with testing.running_worker(conveyor_app, pool="solo", concurrency=1):
        for result in results:
            result.get(timeout=TIMEOUT)
    ran = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert ran == [1, 4, 3, 5, 2, 0, 6]


def test_celery_workflows_run_on_conveyor_workers(celery_client: Any, worker: Worker) -> None:
    from celery import chain as celery_chain
    from celery import chord as celery_chord
    from celery import group as celery_group

    def sig(*args: Any) -> Any:
        return celery_client.signature(args[0], args=args[1:])

    chained = celery_chain(sig("interop.add", 1, 2), sig("interop.add", 3),
                           sig("interop.add", 10)).apply_async()
    assert chained.get(timeout=TIMEOUT) == 16
    assert chained.parent.get(timeout=TIMEOUT) == 6
    grouped = celery_group(sig("interop.add", i, i) for i in range(5)).apply_async()
    assert grouped.get(timeout=TIMEOUT) == [0, 2, 4, 6, 8]
    # Celery's producer sets the chord size in Celery's keys; our workers count the parts.
    chorded = celery_chord([sig("interop.add", i, i) for i in range(10)])(sig("interop.xsum"))
    assert chorded.get(timeout=TIMEOUT) == 90


def test_celery_chord_with_a_failing_part_fails_with_chord_error(
    celery_client: Any, worker: Worker
) -> None:
    from celery import chord as celery_chord
    from celery.exceptions import ChordError

    header = [celery_client.signature("interop.add", args=(1, 1)),
              celery_client.signature("interop.fail", args=("value",))]
    chorded = celery_chord(header)(celery_client.signature("interop.xsum"))
    # A fresh handle: Celery's own would re-raise the failed parent's ValueError first.
    body = celery_client.AsyncResult(chorded.id)
    with pytest.raises(ChordError, match="boom"):
        body.get(timeout=TIMEOUT)
    assert body.status == "FAILURE"
