"""Redis restarts and dropped connections, on a private redis-server this test owns."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.redis.conftest import PrivateRedis, ProcessWorker, start_conveyor_worker
from tests.redis.conveyor_app import make_app

from conveyor import Conveyor, testing

pytestmark = pytest.mark.slow

TIMEOUT = 40


def worker_env(server: PrivateRedis, visibility_timeout: float) -> dict[str, str]:
    return {
        **os.environ,
        "INTEROP_REDIS_URL": server.url,
        "INTEROP_PREFIX": "loss:",
        "INTEROP_VISIBILITY_TIMEOUT": str(visibility_timeout),
    }


def client_app(server: PrivateRedis, visibility_timeout: float) -> Conveyor:
    return make_app(
        broker_url=server.url,
        result_backend=server.url,
        broker_transport_options={
            "global_keyprefix": "loss:",
            "visibility_timeout": visibility_timeout,
        },
        result_backend_transport_options={"global_keyprefix": "loss:"},
    )


def recorded(log: Path) -> Counter[int]:
    if not log.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in log.read_text().splitlines())


def test_worker_survives_a_restart_and_loses_no_late_ack_task(
    private_redis: PrivateRedis, tmp_path: Path, processes: list[ProcessWorker]
) -> None:
    env = worker_env(private_redis, visibility_timeout=3)
    worker = start_conveyor_worker(env, tmp_path / "worker.log", "-P", "prefork", "-c", "2")
    processes.append(worker)
    app = client_app(private_redis, visibility_timeout=3)
    log = tmp_path / "record.log"
    try:
        late = app.tasks["interop.late_record"]
        before = [late.delay(str(log), n, 0.3) for n in range(10)]
        deadline = time.monotonic() + TIMEOUT
        while len(recorded(log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        private_redis.kill()
        time.sleep(1.5)  # the worker notices, logs, backs off
        private_redis.start()
        after = [late.delay(str(log), n, 0.0) for n in range(10, 20)]
        deadline = time.monotonic() + TIMEOUT
        while set(recorded(log)) != set(range(20)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(recorded(log)) == set(range(20)), worker.text()
        assert [r.get(timeout=TIMEOUT) for r in after] == list(range(10, 20))
        # A task whose result could not be stored during the outage ran again later.
        assert [r.get(timeout=TIMEOUT) for r in before] == list(range(10))
    finally:
        app.close()
    text = worker.text()
    assert "is unavailable" in text  # the outage was noticed and logged
    assert worker.stop() == 0, text


def test_dropped_connections_are_reopened_by_worker_and_waiters(
    private_redis: PrivateRedis,
) -> None:
    app = client_app(private_redis, visibility_timeout=60)
    try:
        with testing.running_worker(app, pool="threads", concurrency=2) as worker:
            assert app.send_task("interop.add", (1, 2)).get(timeout=TIMEOUT) == 3
            slow = app.send_task("interop.sleep", (1.0,))
            waited: dict[str, object] = {}
            waiter = threading.Thread(target=lambda: waited.update(v=slow.get(timeout=TIMEOUT)))
            waiter.start()
            time.sleep(0.3)  # the waiter is subscribed, the worker is running the task
            private_redis.drop_clients()
            waiter.join(TIMEOUT)
            assert waited == {"v": 1.0}
            assert app.send_task("interop.add", (2, 2)).get(timeout=TIMEOUT) == 4
            assert worker.consuming
    finally:
        app.close()


def test_a_result_wait_spans_a_restart(private_redis: PrivateRedis) -> None:
    app = client_app(private_redis, visibility_timeout=60)
    try:
        result = app.send_task("interop.add", (20, 22))
        waited: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: waited.update(v=result.get(timeout=TIMEOUT)))
        waiter.start()
        time.sleep(0.3)
        private_redis.restart()  # the queued task survives (append-only file)
        with testing.running_worker(app, pool="threads", concurrency=1):
            waiter.join(TIMEOUT)
        assert waited == {"v": 42}
    finally:
        app.close()


def test_a_frozen_server_times_out_instead_of_hanging_the_worker(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    import signal

    app = make_app(
        broker_url=private_redis.url,
        result_backend=private_redis.url,
        broker_transport_options={
            "global_keyprefix": "loss:",
            "visibility_timeout": 60,
            "socket_timeout": 0.5,
        },
        result_backend_transport_options={"global_keyprefix": "loss:"},
    )
    assert private_redis.process is not None
    try:
        with testing.running_worker(app, pool="threads", concurrency=1) as worker:
            assert app.send_task("interop.add", (1, 1)).get(timeout=TIMEOUT) == 2
            private_redis.process.send_signal(signal.SIGSTOP)  # sockets open, no replies
            try:
                deadline = time.monotonic() + TIMEOUT
                while worker.consuming and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not worker.consuming
            finally:
                private_redis.process.send_signal(signal.SIGCONT)
            assert app.send_task("interop.add", (2, 3)).get(timeout=TIMEOUT) == 5
    finally:
        app.close()
    assert "Fetching from the broker failed" in caplog.text


def test_an_idle_worker_logs_the_outage_and_resumes(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    app = client_app(private_redis, visibility_timeout=60)
    try:
        with testing.running_worker(app, pool="threads", concurrency=1) as worker:
            assert app.send_task("interop.add", (1, 1)).get(timeout=TIMEOUT) == 2
            private_redis.kill()
            time.sleep(2.0)  # long enough for two failed fetches and a longer backoff
            assert not worker.consuming
            private_redis.start()
            assert app.send_task("interop.add", (2, 3)).get(timeout=TIMEOUT) == 5
            assert worker.consuming
    finally:
        app.close()
    assert "Fetching from the broker failed" in caplog.text
    assert "Broker reachable again" in caplog.text
