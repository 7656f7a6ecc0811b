"""The prefork supervisor and its consuming processes, with real ``conveyor worker`` runs.

What ``test_worker_process.py`` leaves out: the processes end with a killed supervisor,
the CLI's ``-b`` reaches them, dead processes are replaced (after a task, while idle, at
start), the early-ack messages of a dead process are not left to run again, the one stop
summary counts every process's tasks, the memory broker is refused, and on Redis a dead
process's prefetched messages come back at once, not a lease later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests.apps import proc_app
from tests.integration.workers import (
    ROOT,
    WorkerProcess,
    process_alive,
    start_worker,
    wait_until,
)
from tests.redis.scratch import worker_env

from conveyor import Conveyor
from conveyor.errors import ConfigurationError, WorkerLostError
from conveyor.result import AsyncResult
from conveyor.testing import memory_app
from conveyor.worker.supervisor import Supervisor

pytestmark = pytest.mark.slow


def start_with_broker(env: dict[str, str], log: Path, broker: str, *args: str) -> WorkerProcess:
    """``conveyor -b BROKER -A tests.apps.proc_app worker``: the CLI's broker override."""
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "-b", broker, "-A", "tests.apps.proc_app",
             "worker", "-l", "info", *args],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    worker = WorkerProcess(process, log)
    worker.wait_for_log(" ready: ")
    return worker


def gone(pid: int) -> bool:
    """Ended (a zombie waiting for its parent to reap it counts as ended)."""
    if not process_alive(pid):
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pool_pids(worker: WorkerProcess) -> set[int]:
    """The worker's consuming processes: the fork server's children."""
    pids: set[int] = set()
    for child in psutil.Process(worker.process.pid).children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                pids.update(p.pid for p in child.children() if not gone(p.pid))
        except psutil.NoSuchProcess:
            continue
    return pids


def test_killing_the_worker_ends_its_processes(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    worker = start_worker({**env, "TMPDIR": str(private_tmp)}, tmp_path / "w.log", "-c", "2")
    workers.append(worker)
    pid = proc_app.pid.delay().get(timeout=20)
    assert pid != worker.process.pid
    assert len(list(private_tmp.glob("conveyor-gate-*"))) == 1
    wait_until(lambda: len(pool_pids(worker)) == 2, what="both processes up")
    descendants = psutil.Process(worker.process.pid).children(recursive=True)
    assert pid in {p.pid for p in descendants}
    # The fork server and the two processes, and no other interpreter (multiprocessing's
    # fork server would have started a resource tracker too).
    assert len(descendants) == 3, [" ".join(p.cmdline())[:80] for p in descendants]
    worker.kill()  # SIGKILL: the supervisor gets no chance to stop anything
    wait_until(lambda: gone(pid), timeout=10, what=f"process {pid} gone")
    # Nothing it started lives on: not the other process, not the fork server.
    wait_until(lambda: all(gone(p.pid) for p in descendants), timeout=10,
               what="every process the worker started gone")
    # Its processes removed the idle gate, and nothing else was left there.
    assert list(private_tmp.iterdir()) == []


def test_the_cli_broker_override_reaches_the_processes(
    env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    override = f"sqlite:///{tmp_path / 'override.db'}"
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    worker = start_with_broker({**env, "CONVEYOR_BROKER_URL": elsewhere},
                               tmp_path / "w.log", override, "-c", "2")
    workers.append(worker)
    client = Conveyor("client")
    client.configure(broker_url=override)  # as -b does (CONVEYOR_BROKER_URL wins over broker=)
    try:
        result = client.send_task("tests.apps.proc_app.pid")
        pid = result.get(timeout=10)
        assert pid != worker.process.pid  # run by one of the prefork processes
        assert client.send_task("tests.apps.proc_app.add", (2, 3)).get(timeout=10) == 5
    finally:
        client.close()
    assert worker.stop() == 0
    assert "stopped after 2 tasks" in worker.text()


def test_processes_killed_by_their_tasks_are_replaced_at_once(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    began = time.monotonic()
    deaths = [proc_app.die.delay() for _ in range(4)]
    after = proc_app.add.delay(20, 22)
    for died in deaths:
        with pytest.raises(WorkerLostError, match="exitcode 3"):
            died.get(timeout=20)
    assert after.get(timeout=20) == 42
    assert time.monotonic() - began < 5  # no start-up back-off after a task's death
    text = worker.text()
    for died in deaths:
        assert f"running tests.apps.proc_app.die[{died.id}] exited with code 3" in text
    assert "exited at start" not in text
    assert proc_app.add.delay(1, 2).get(timeout=20) == 3
    assert worker.stop() == 0


def test_processes_that_die_idle_or_at_start_are_replaced(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    idle = proc_app.pid.delay().get(timeout=20)
    time.sleep(1.2)  # past its first second, and done recording the task's end
    os.kill(idle, signal.SIGKILL)
    worker.wait_for_log(f"Idle process {idle} exited with code -9; replacing it")
    assert f"Process {idle} exited at start" not in worker.text()

    # Its replacement is killed as it starts: replaced too, after a pause that keeps a
    # crash loop (an app that cannot start) slow.
    def fresh() -> set[int]:
        return pool_pids(worker) - {idle}

    wait_until(lambda: bool(fresh()), timeout=10, what="a replacement process")
    (starting,) = fresh()
    os.kill(starting, signal.SIGKILL)
    worker.wait_for_log(f"Process {starting} exited at start (code -9); next one in 1s")

    served = {r.get(timeout=20) for r in [proc_app.pid.delay() for _ in range(3)]}
    assert len(served) == 1
    assert served.isdisjoint({idle, starting})
    assert proc_app.add.delay(1, 2).get(timeout=20) == 3
    assert worker.stop() == 0


def fork_server_pid(worker: WorkerProcess) -> int:
    (server,) = [child for child in psutil.Process(worker.process.pid).children()
                 if "forkserver" in " ".join(child.cmdline())]
    return int(server.pid)


def test_a_killed_fork_server_takes_its_processes_and_both_are_replaced(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(env, tmp_path / "w.log", "-c", "2")
    workers.append(worker)
    wait_until(lambda: len(pool_pids(worker)) == 2, what="both processes up")
    before = pool_pids(worker)
    server = fork_server_pid(worker)
    os.kill(server, signal.SIGKILL)
    # Its processes die with it (Linux's parent-death signal), a new fork server starts
    # new ones, and the worker goes on.
    wait_until(lambda: all(gone(pid) for pid in before), timeout=10,
               what="the old processes gone")
    wait_until(lambda: len(pool_pids(worker)) == 2, timeout=20, what="two new processes")
    assert fork_server_pid(worker) != server
    served = {r.get(timeout=20) for r in [proc_app.pid.delay() for _ in range(4)]}
    assert served <= pool_pids(worker)
    assert served.isdisjoint(before)
    assert worker.stop() == 0


def test_sigterm_to_every_process_of_the_worker_is_a_warm_shutdown(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # What a service manager does on stop: SIGTERM to each process of the service.
    worker = start_worker(env, tmp_path / "w.log", "-c", "2")
    workers.append(worker)
    log = tmp_path / "task.log"
    result = proc_app.long_running.delay(str(log), 1.5)
    wait_until(lambda: log.exists(), what="the task started")
    tree = [worker.process.pid,
            *(p.pid for p in psutil.Process(worker.process.pid).children(recursive=True))]
    assert len(tree) == 4  # the supervisor, the fork server, two processes
    for pid in tree:
        os.kill(pid, signal.SIGTERM)
    # The running task finishes: the fork server did not die and take it down.
    assert result.get(timeout=20) == "done"
    assert worker.process.wait(timeout=20) == 0
    assert "stopped after 1 tasks" in worker.text()


def test_an_early_ack_task_that_killed_its_process_is_not_left_to_run_again(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # Its ack was queued in the process when it started and may have died with it: the
    # supervisor acknowledges it, or the message would come back when its lease lapses.
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    deaths = [proc_app.die.delay() for _ in range(6)]  # each ack lost or not: a race
    for died in deaths:
        with pytest.raises(WorkerLostError):
            died.get(timeout=20)
    assert worker.stop() == 0
    stats = app.broker.stats(["celery"])[0]
    assert (stats.ready, stats.leased) == (0, 0)  # leased: back in 2 s, and run again
    text = worker.text()
    for died in deaths:
        assert text.count(f"die[{died.id}] exited with code") == 1


def test_tasks_that_ran_before_their_process_died_do_not_run_again(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # Their acks may still have been queued in the process's acker when it died: the
    # supervisor sends them again, or the messages would come back when their leases
    # lapse and run a second time.
    log = tmp_path / "record.log"
    worker = start_worker(env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    rounds = 5  # whether an ack was still queued when the process died is a race
    for round_ in range(rounds):
        ran = [proc_app.record.delay(str(log), 10 * round_ + n) for n in range(3)]
        died = proc_app.die.delay()
        assert [r.get(timeout=20) for r in ran] == [10 * round_ + n for n in range(3)]
        with pytest.raises(WorkerLostError):
            died.get(timeout=20)
    time.sleep(3)  # past the 2 s lease of any message whose ack was lost
    assert worker.stop() == 0
    lines = log.read_text().split()
    assert sorted(lines, key=int) == [str(10 * r + n) for r in range(rounds) for n in range(3)]


def test_a_warm_stop_logs_one_summary_counting_every_process(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # Processes retire after 4 tasks: the count must include the ones that are gone.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    worker = start_worker({**env, "TMPDIR": str(private_tmp)}, tmp_path / "w.log", "-c", "2",
                          "--max-tasks-per-child", "4")
    workers.append(worker)
    results = [proc_app.add.delay(n, 1) for n in range(13)]
    assert [r.get(timeout=20) for r in results] == [n + 1 for n in range(13)]
    assert worker.stop() == 0
    assert list(private_tmp.iterdir()) == []  # nothing left behind, the idle gate included
    text = worker.text()
    assert "Process retiring after 4 tasks" in text
    assert text.count("stopped after") == 1, text
    assert "stopped after 13 tasks" in text


def test_the_memory_broker_is_refused_with_a_pointer_to_threads() -> None:
    app = memory_app()
    try:
        with pytest.raises(ConfigurationError, match="threads") as caught:
            Supervisor(app, app_spec="x")
        assert "memory://" in str(caught.value)
    finally:
        app.close()


# -- Redis: what a dead process prefetched comes back at once, not when its lease lapses --


@pytest.fixture
def redis_env(redis_service: str,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Broker and backend on Redis under a key prefix of this test, with hour-long leases."""
    with worker_env(redis_service, monkeypatch, "prefork-", visibility_timeout=3600) as env:
        yield env


@pytest.fixture
def redis_app(redis_env: dict[str, str]) -> Iterator[Conveyor]:
    proc_app.app.config_from_object({})
    yield proc_app.app
    proc_app.app.close()


def test_on_redis_a_dead_process_prefetched_messages_run_at_once(
    redis_app: Conveyor, redis_env: dict[str, str], tmp_path: Path,
    workers: list[WorkerProcess]
) -> None:
    # All queued before the worker starts, so its process fetches them in one go; the
    # first task gives it time to record them all before the second kills it.
    first = proc_app.sleep_for.delay(0.5)
    died = proc_app.die.delay()
    behind = [proc_app.pid.delay() for _ in range(4)]
    worker = start_worker(redis_env, tmp_path / "w.log", "-c", "1",
                          "--prefetch-multiplier", "8")
    workers.append(worker)
    assert first.get(timeout=20) == 0.5
    assert_run_at_once_after_the_death(redis_app, worker, died, behind)


def assert_run_at_once_after_the_death(app: Conveyor, worker: WorkerProcess,
                                       died: AsyncResult[Any],
                                       behind: list[AsyncResult[Any]]) -> None:
    with pytest.raises(WorkerLostError):
        died.get(timeout=20)
    began = time.monotonic()
    pids = {r.get(timeout=10) for r in behind}  # a lease is an hour: only a give-back helps
    assert time.monotonic() - began < 10
    assert len(pids) == 1  # all run by the process that replaced the dead one
    assert worker.stop() == 0
    stats = app.broker.stats(["celery"])[0]
    assert (stats.ready, stats.leased) == (0, 0)  # nothing left to come back in an hour


def test_on_redis_what_a_dead_process_fetched_ahead_runs_at_once(
    redis_app: Conveyor, redis_env: dict[str, str], tmp_path: Path,
    workers: list[WorkerProcess]
) -> None:
    # One fetch takes the first four; when the last of them (die) starts, the process
    # sends the next fetch ahead, for the four behind, and dies before reading its reply.
    before = [proc_app.add.delay(n, 0) for n in range(3)]
    died = proc_app.die.delay()
    behind = [proc_app.pid.delay() for _ in range(4)]
    worker = start_worker(redis_env, tmp_path / "w.log", "-c", "1")
    workers.append(worker)
    assert [r.get(timeout=20) for r in before] == [0, 1, 2]
    assert_run_at_once_after_the_death(redis_app, worker, died, behind)
    assert "Gave back 4 messages process" in worker.text()


@pytest.fixture
def short_lease_env(redis_service: str,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Broker and backend on Redis under a key prefix of this test, with 2 s leases."""
    with worker_env(redis_service, monkeypatch, "prefork-", visibility_timeout=2) as env:
        proc_app.app.config_from_object({})
        yield env
        proc_app.app.close()


def test_on_redis_what_a_long_task_fetched_ahead_stays_leased_to_it(
    short_lease_env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # A 4 s task on 2 s leases: what was fetched ahead when it started must be renewed
    # with the rest, or the other worker would run it too once its lease lapsed. The
    # first fetch (a window of 2) takes 9 and block; block, the last, sends the next.
    env = short_lease_env
    log = tmp_path / "record.log"
    results = [proc_app.record.delay(str(log), 9)]
    blocked = proc_app.block.delay(str(log), 4)
    results += [proc_app.record.delay(str(log), n) for n in range(4)]
    first = start_worker(env, tmp_path / "w1.log", "-c", "1", "--prefetch-multiplier", "2")
    workers.append(first)
    wait_until(lambda: log.exists() and "block" in log.read_text(), what="block started")
    second = start_worker(env, tmp_path / "w2.log", "-c", "1")
    workers.append(second)
    assert sorted(r.get(timeout=30) for r in results) == [0, 1, 2, 3, 9]
    blocked.get(timeout=20)
    time.sleep(1.0)  # time enough for the first worker to run what it held after block
    lines = log.read_text().split()
    assert sorted(lines) == ["0", "1", "2", "3", "9", "block"], lines  # each ran once
    assert first.stop() == 0
    assert second.stop() == 0


def test_a_process_that_cannot_be_forked_is_tried_again_later(
    app: Conveyor, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    class OutOfProcesses:
        def start_process(self, *args: Any) -> Any:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    supervisor = Supervisor(app, app_spec="tests.apps.proc_app:app", concurrency=2)
    supervisor._fork_server = OutOfProcesses()  # type: ignore[assignment]
    now = time.monotonic()
    supervisor._ensure_size(now)  # logs instead of raising: the worker goes on
    assert supervisor._children == []
    assert supervisor._respawn_after >= now + 1.0
    assert "Could not start a process" in caplog.text
    supervisor._ensure_size(now + 0.5)  # not before the delay
    assert caplog.text.count("Could not start a process") == 1
