"""The worker-process suite (``tests/integration/test_worker_process.py``: crash recovery,
warm and cold shutdown, time limits, lost processes, autoscale, CLI) on Redis.

The suite's tests are collected here too, so they run with this module's fixtures: the
same worker processes and app, with broker and backend on Redis under a key prefix of
their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.apps import proc_app
from tests.integration import test_worker_process as suite
from tests.integration.conftest import workers  # noqa: F401 - the suite's fixture
from tests.redis.scratch import delete_prefixed, scratch_prefix

from conveyor import Conveyor

pytestmark = pytest.mark.slow

for _name in dir(suite):
    if _name.startswith("test_"):
        globals()[_name] = getattr(suite, _name)


@pytest.fixture
def env(
    redis_service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """As the suite's own ``env`` (2 s leases), with Redis for broker and backend."""
    # The prefix rides in the URL: the suite also runs the CLI against other brokers
    # with these variables set, and transport options are given to whichever broker.
    prefix = scratch_prefix("process-")
    url = f"{redis_service}?global_keyprefix={prefix}"
    values = {
        "CONVEYOR_BROKER_URL": url,
        "CONVEYOR_RESULT_BACKEND": url,
        "CONVEYOR_BROKER_TRANSPORT_OPTIONS": json.dumps({"visibility_timeout": 2}),
        # A result a worker stores after the test deleted its keys expires soon anyway.
        "CONVEYOR_RESULT_EXPIRES": "600",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    yield {**os.environ, **values}
    delete_prefixed(redis_service, prefix)


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Conveyor]:
    proc_app.app.config_from_object({})
    yield proc_app.app
    proc_app.app.close()
