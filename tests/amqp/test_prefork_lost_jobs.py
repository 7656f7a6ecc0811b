"""Prefork processes consume from RabbitMQ themselves. When one dies running a late-ack
task, RabbitMQ (not the supervisor, which cannot settle another connection's delivery)
puts the message back; it must still end as a Celery worker would end it: failed once,
acknowledged, not run again."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.amqp.conftest import ProcessWorker, start_conveyor_worker
from tests.amqp.test_connection_loss import wait_for

from conveyor import Conveyor
from conveyor.errors import TimeLimitExceeded, WorkerLostError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("task", "error"), [("interop.late_die", WorkerLostError),
                                             ("interop.late_overrun", TimeLimitExceeded)])
def test_a_late_ack_task_whose_process_ended_is_failed_once_and_not_run_again(
    interop: dict[str, str], conveyor_app: Conveyor, processes: list[ProcessWorker],
    tmp_path: Path, task: str, error: type[Exception],
) -> None:
    runs = tmp_path / "runs.log"
    worker = start_conveyor_worker(interop, tmp_path / "w.log", "-Q", "celery",
                                   "-P", "prefork", "-c", "2")
    processes.append(worker)
    result = conveyor_app.tasks[task].delay(str(runs))
    with pytest.raises(error):
        result.get(timeout=30)
    wait_for(lambda: "acknowledged, not run" in worker.text(), what="redelivery settled")
    assert conveyor_app.tasks["interop.add"].delay(1, 2).get(timeout=30) == 3
    assert runs.read_text().split() == ["run"]
    assert worker.stop() == 0
