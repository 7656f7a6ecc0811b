"""The worker-process suite (``tests/integration/test_worker_process.py``: crash recovery,
warm and cold shutdown, time limits, lost processes, autoscale, CLI) and the chord crash
test on RabbitMQ.

Their tests are collected here too, so they run with this module's fixtures: the same
worker processes and app, with the broker on a private RabbitMQ vhost. Results go to a
SQLite file, which every process of the test can read (rpc:// results only reach the
process that sent the task: the CLI's ``result`` command could not see them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.apps import proc_app
from tests.integration import test_chord_crash as chord_suite
from tests.integration import test_worker_process as suite
from tests.integration.conftest import workers  # noqa: F401 - the suites' fixture

from conveyor import Conveyor

pytestmark = pytest.mark.slow

for _suite in (suite, chord_suite):
    for _name in dir(_suite):
        if _name.startswith("test_"):
            globals()[_name] = getattr(_suite, _name)


@pytest.fixture
def env(amqp_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """As the suites' own ``env`` (2 s leases, which RabbitMQ does not need), on RabbitMQ."""
    values = {
        "CONVEYOR_BROKER_URL": amqp_url,
        "CONVEYOR_RESULT_BACKEND": f"sqlite:///{tmp_path / 'results.db'}",
        "CONVEYOR_BROKER_TRANSPORT_OPTIONS": json.dumps({"visibility_timeout": 2}),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Conveyor]:
    proc_app.app.config_from_object({})
    yield proc_app.app
    proc_app.app.close()
