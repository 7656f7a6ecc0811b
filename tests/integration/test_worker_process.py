"""A real ``conveyor worker`` process on the SQLite default, driven from the test."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from tests.apps import proc_app
from tests.integration.workers import (
    WorkerProcess,
    conveyor_command,
    start_worker,
    wait_until,
)

from conveyor import Conveyor, states
from conveyor.errors import TimeLimitExceeded, WorkerLostError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("pool", ["prefork", "threads", "asyncio", "solo"])
def test_every_pool_runs_tasks_and_stops_cleanly(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess],
    pool: str
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "2", "-n", "w1@%h", "-P", pool)
    workers.append(worker)
    sums = [proc_app.add.delay(i, i) for i in range(40)]
    doubles = [proc_app.double.delay(i) for i in range(10)]
    assert [r.get(timeout=20) for r in sums] == [2 * i for i in range(40)]
    assert [r.get(timeout=20) for r in doubles] == [2 * i for i in range(10)]
    assert worker.stop() == 0
    assert "w1@" in worker.text()
    assert "stopped after 50 tasks" in worker.text()


def test_late_ack_task_survives_a_killed_worker(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    log = tmp_path / "slow.log"
    first = start_worker(env, tmp_path / "w1.log", "-c", "1")
    workers.append(first)
    result = proc_app.slow_once.delay(str(log), 60)
    wait_until(lambda: log.exists(), what="task started")
    first.kill()  # SIGKILL: no chance to give anything back
    second = start_worker(env, tmp_path / "w2.log", "-c", "1")
    workers.append(second)
    assert result.get(timeout=30) == "finished"
    lines = log.read_text().split()
    assert lines.count("start") == 2  # run again once the dead worker's lease lapsed
    second.stop()


def test_prefetched_messages_are_not_lost_when_a_worker_is_killed(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    log = tmp_path / "record.log"
    # Queued before the worker starts: its first fetch takes all seven. A worker already
    # idle could take the first alone, and could not prefetch the rest behind it.
    proc_app.block.delay(str(log), 60)
    results = [proc_app.record.delay(str(log), n) for n in range(6)]
    first = start_worker(env, tmp_path / "w1.log", "-c", "1", "--prefetch-multiplier", "8")
    workers.append(first)
    wait_until(lambda: log.exists() and "block" in log.read_text(), what="block started")
    wait_until(lambda: app.broker.stats(["celery"])[0].ready == 0, what="all prefetched")
    first.kill()
    second = start_worker(env, tmp_path / "w2.log", "-c", "2")
    workers.append(second)
    assert sorted(r.get(timeout=30) for r in results) == list(range(6))
    second.stop()


def test_warm_shutdown_finishes_running_and_returns_prefetched(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--prefetch-multiplier", "4")
    workers.append(worker)
    running = proc_app.sleep_for.delay(1.0)
    waiting = [proc_app.sleep_for.delay(0.01) for _ in range(3)]
    wait_until(lambda: "sleep_for" in worker.text() and app.broker.stats(["celery"])[0]
               .ready == 0, what="prefetched")
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(timeout=20) == 0
    assert running.state == states.SUCCESS
    stats = app.broker.stats(["celery"])[0]
    assert stats.leased == 0
    assert stats.ready + sum(r.state == states.SUCCESS for r in waiting) == 3


def test_hard_time_limit_and_lost_process_fail_the_task_not_the_worker(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    overrun = proc_app.overrun.delay()
    with pytest.raises(TimeLimitExceeded):
        overrun.get(timeout=20)
    died = proc_app.die.delay()
    with pytest.raises(WorkerLostError):
        died.get(timeout=20)
    assert proc_app.add.delay(1, 2).get(timeout=20) == 3
    worker.stop()


def test_soft_time_limit_is_raised_inside_the_task_of_a_prefork_process(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    assert proc_app.soft_limited.delay(30).get(timeout=20) == "soft limit"
    assert proc_app.soft_limited.delay(0.01).get(timeout=20) == "in time"
    time.sleep(0.6)  # past the limit of the finished job: no stray signal ends the process
    assert proc_app.add.delay(1, 2).get(timeout=20) == 3
    assert worker.stop() == 0


def test_max_tasks_per_child_replaces_processes(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--max-tasks-per-child", "2")
    workers.append(worker)
    pids = [proc_app.pid.delay().get(timeout=20) for _ in range(6)]
    assert len(set(pids)) == 3
    worker.stop()


def test_autoscale_grows_under_load_and_shrinks_when_idle(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    env = {**env, "CONVEYOR_WORKER_AUTOSCALE_KEEPALIVE": "0.5"}
    worker = start_worker(env, tmp_path / "w.log", "--autoscale=3,1")
    workers.append(worker)
    results = [proc_app.sleep_for.delay(0.4) for _ in range(12)]
    for result in results:
        result.get(timeout=30)
    worker.wait_for_log("Autoscale: growing")
    worker.wait_for_log("Autoscale: shrinking", timeout=20)
    worker.stop()


def test_cli_call_result_status_purge(app: Conveyor, env: dict[str, str], tmp_path: Path,
                                      workers: list[WorkerProcess]) -> None:
    queued = conveyor_command(["-A", "tests.apps.proc_app", "call", "tests.apps.proc_app.add",
                               "--args", "[4, 4]"], env)
    assert queued.returncode == 0, queued.stderr
    task_id = queued.stdout.strip()
    status = conveyor_command(["-A", "tests.apps.proc_app", "status"], env)
    assert status.returncode == 0
    assert "celery" in status.stdout
    pending = conveyor_command(["-A", "tests.apps.proc_app", "result", task_id], env)
    assert pending.stdout.startswith("PENDING")
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    done = conveyor_command(["-A", "tests.apps.proc_app", "result", task_id, "--wait",
                             "--timeout", "20"], env)
    assert (done.returncode, done.stdout.strip()) == (0, "SUCCESS: 8")
    worker.stop()
    for _ in range(2):
        conveyor_command(["-A", "tests.apps.proc_app", "call", "tests.apps.proc_app.add",
                          "--args", "[1, 1]"], env)
    purged = conveyor_command(["-A", "tests.apps.proc_app", "purge", "-f"], env)
    assert purged.returncode == 0
    assert "Purged 2 messages" in purged.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-A", "no_such_module", "status"], 3, "cannot import"),
        (["-b", "nosuch://x", "status"], 4, "unknown broker scheme"),
        (["-b", "sqlite:////proc/no-such-dir/x.db", "status"], 5, "cannot reach the broker"),
        (["-b", "redis://127.0.0.1:1/0", "status"], 5, "cannot reach the broker"),
        (["call", "x", "--args", "{bad"], 2, "not valid JSON"),
        (["-A", "tests.apps.proc_app", "result", "never-stored", "--wait", "--timeout",
          "0.2"], 6, "not ready"),
    ],
)
def test_cli_exit_codes(env: dict[str, str], args: list[str], code: int, message: str) -> None:
    completed = conveyor_command(args, env)
    assert completed.returncode == code, completed.stderr
    assert message in completed.stderr


def test_cli_result_of_a_failed_task_exits_1(app: Conveyor, env: dict[str, str],
                                             tmp_path: Path,
                                             workers: list[WorkerProcess]) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    failed = proc_app.die.delay()
    with pytest.raises(WorkerLostError):
        failed.get(timeout=20)
    shown = conveyor_command(["-A", "tests.apps.proc_app", "result", failed.id], env)
    assert shown.returncode == 1
    assert shown.stdout.startswith("FAILURE")
    worker.stop()


def test_a_slow_task_is_not_run_twice_because_its_lease_is_renewed(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    log = tmp_path / "long.log"
    first = start_worker(env, tmp_path / "w1.log", "-c", "1")
    workers.append(first)
    result = proc_app.long_running.delay(str(log), 5.0)  # 2.5 x the 2 s lease
    wait_until(lambda: log.exists(), what="task started")
    second = start_worker(env, tmp_path / "w2.log", "-c", "1")
    workers.append(second)
    assert result.get(timeout=30) == "done"
    assert log.read_text().count("start") == 1
    first.stop()
    second.stop()


def test_cold_shutdown_gives_a_running_late_ack_task_back(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    log = tmp_path / "long.log"
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    result = proc_app.long_running.delay(str(log), 30.0)
    wait_until(lambda: log.exists(), what="task started")
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("Warm shutdown")
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(timeout=20) == 0
    assert "Cold shutdown" in worker.text()
    stats = app.broker.stats(["celery"])[0]
    assert (stats.ready, stats.leased) == (1, 0)
    assert result.state == states.PENDING


def test_a_job_queued_behind_a_dying_one_runs_elsewhere(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    died = proc_app.die.delay()
    behind = [proc_app.add.delay(n, n) for n in range(3)]  # some wait in the child's pipe
    with pytest.raises(WorkerLostError):
        died.get(timeout=20)
    assert [r.get(timeout=20) for r in behind] == [0, 2, 4]
    worker.stop()
