"""A Celery worker and a Conveyor worker consume one RabbitMQ queue: nothing lost, nothing
run twice, whoever sent the task and whether it waited for a countdown."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.conftest import ProcessWorker, start_celery_worker, start_conveyor_worker
from tests.amqp.vhosts import rabbitmqctl

from conveyor import Conveyor

pytestmark = pytest.mark.slow


def test_celery_and_conveyor_workers_share_a_queue(
    interop: dict[str, str],
    vhost: str,
    conveyor_app: Conveyor,
    celery_client: Any,
    processes: list[ProcessWorker],
    tmp_path: Path,
) -> None:
    log = tmp_path / "record.log"
    processes.append(start_celery_worker(interop, tmp_path / "celery.log", "-Q", "celery"))
    processes.append(
        start_conveyor_worker(
            interop, tmp_path / "conveyor.log", "-Q", "celery", "-P", "prefork", "-c", "2"
        )
    )
    results = []
    for n in range(300):
        options: dict[str, Any] = {"countdown": 0.5} if n % 10 == 0 else {}
        if n % 2:
            results.append(conveyor_app.send_task("interop.record", (str(log), n), **options))
        else:
            results.append(celery_client.send_task("interop.record", args=(str(log), n), **options))
    assert sorted(result.get(timeout=60) for result in results) == list(range(300))
    for worker in processes:
        assert worker.stop() == 0, worker.text()

    lines = log.read_text().splitlines()
    ran = Counter(line.split()[0] for line in lines)
    assert sorted(ran, key=int) == [str(n) for n in range(300)]
    assert set(ran.values()) == {1}, [n for n, times in ran.items() if times > 1]
    assert {line.split()[1] for line in lines} == {"celery", "conveyor"}
    listed = rabbitmqctl(
        "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages"
    )
    depths = dict(line.split("\t") for line in listed.strip().splitlines())
    assert depths["celery"] == "0"
    assert all(
        depth == "0" for name, depth in depths.items() if name.startswith("conveyor.delay")
    ), depths
