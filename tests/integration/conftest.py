"""Fixtures for tests that run real worker processes on the SQLite default."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.apps import proc_app
from tests.integration.workers import WorkerProcess

from conveyor import Conveyor


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for this process and the workers: a fresh database, 2 s leases."""
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    values = {"CONVEYOR_BROKER_URL": url, "CONVEYOR_RESULT_BACKEND": url,
              "CONVEYOR_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 2}'}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Conveyor]:
    """``tests.apps.proc_app``, re-reading the environment of this test."""
    proc_app.app.config_from_object({})
    yield proc_app.app
    proc_app.app.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; any still running at the end are killed."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()
