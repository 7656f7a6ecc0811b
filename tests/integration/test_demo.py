"""``conveyor demo``: the README's first command, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.demo_run import _plan

pytestmark = pytest.mark.slow


def test_demo_runs_every_kind_of_task_and_exits_cleanly(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("CONVEYOR_")}
    completed = subprocess.run(
        [sys.executable, "-m", "conveyor", "demo", "--tasks", "200", "--dir",
         str(tmp_path / "demo")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "demo.db" in output
    assert "200 tasks in" in output
    # Every kind ran: successes for the good ones (flaky after its retry), failures for
    # the broken one, and nothing left hanging.
    for kind in ("add", "fetch", "audit", "flaky", "broken"):
        assert kind in output
    broken = sum(kind == "broken" for kind, _ in _plan(200))
    assert broken > 0
    assert f"FAILURE: {broken}, SUCCESS: {200 - broken}" in output
    log = (tmp_path / "demo" / "demo-worker.log").read_text()
    assert "retry" in log
    assert "stopped after" in log
    assert "Traceback" in log  # the broken task's, kept for the user
