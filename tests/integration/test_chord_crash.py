"""A 1,000-part chord over two worker processes, one of them SIGKILLed halfway."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import Conveyor
from conveyor.canvas import chord
from tests.apps import proc_app
from tests.integration.workers import WorkerProcess, start_worker, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    values = {"CONVEYOR_BROKER_URL": url, "CONVEYOR_RESULT_BACKEND": url,
              "CONVEYOR_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 2}'}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Conveyor]:
    proc_app.app.config_from_object({})
    yield proc_app.app
    proc_app.app.close()


def test_chord_body_runs_exactly_once_when_a_worker_dies(
    app: Conveyor, env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "body.log"
    result = chord([proc_app.part.s(i) for i in range(1000)],
                   proc_app.collect.s(str(log))).apply_async()
    workers: list[WorkerProcess] = []
    try:
        victim = start_worker(env, tmp_path / "a.log", "-c", "2", "-n", "a@%h")
        workers.append(victim)
        survivor = start_worker(env, tmp_path / "b.log", "-c", "2", "-n", "b@%h")
        workers.append(survivor)
        wait_until(lambda: victim.text().count("succeeded") >= 150, timeout=60,
                   what="the victim ran part of the header")
        victim.kill()
        assert result.get(timeout=120) == sum(range(1000))
        time.sleep(3)  # room for a duplicate to show up: leases lapse after 2 s
        lines = log.read_text().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("1000 499500")
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.kill()
