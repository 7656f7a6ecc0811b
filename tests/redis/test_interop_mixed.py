"""A Celery worker and a Conveyor worker consume one queue: nothing lost, nothing twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.redis.conftest import ProcessWorker, start_celery_worker, start_conveyor_worker

import redis
from conveyor import Conveyor

pytestmark = pytest.mark.slow


def test_celery_and_conveyor_workers_share_a_queue(
    interop: dict[str, str],
    prefix: str,
    redis_url: str,
    conveyor_app: Conveyor,
    celery_client: Any,
    processes: list[ProcessWorker],
    tmp_path: Path,
) -> None:
    log = tmp_path / "record.log"
    processes.append(start_celery_worker(interop, tmp_path / "celery.log"))
    processes.append(
        start_conveyor_worker(interop, tmp_path / "conveyor.log", "-P", "prefork", "-c", "2")
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

    ran = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert sorted(ran, key=int) == [str(n) for n in range(300)]
    assert set(ran.values()) == {1}, [n for n, times in ran.items() if times > 1]
    kinds = {line.split()[1] for line in log.read_text().splitlines()}
    assert kinds == {"celery", "conveyor"}
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen(f"{prefix}celery") == 0
        assert client.hlen(f"{prefix}unacked") == 0
        assert client.zcard(f"{prefix}unacked_index") == 0
        assert client.zcard(f"{prefix}_conveyor.delayed.celery") == 0
    finally:
        client.close()
