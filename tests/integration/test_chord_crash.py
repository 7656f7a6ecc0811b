"""A 1,000-part chord over two worker processes, one of them SIGKILLed halfway."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.apps import proc_app
from tests.integration.workers import WorkerProcess, start_worker, wait_until

from conveyor import Conveyor
from conveyor.canvas import chord

pytestmark = pytest.mark.slow


def test_chord_body_runs_exactly_once_when_a_worker_dies(
    app: Conveyor, env: dict[str, str], tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    log = tmp_path / "body.log"
    result = chord([proc_app.part.s(i) for i in range(1000)],
                   proc_app.collect.s(str(log))).apply_async()
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
