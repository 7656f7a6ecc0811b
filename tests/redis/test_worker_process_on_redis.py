"""The worker-process suite (``tests/integration/test_worker_process.py``: crash recovery,
warm and cold shutdown, time limits, lost processes, autoscale, CLI) on Redis.

The suite's tests are collected here too, so they run with this module's fixtures: the
same worker processes and app, with broker and backend on Redis under a key prefix of
their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.apps import proc_app
from tests.integration import test_chord_crash as chord_suite
from tests.integration import test_worker_process as suite
from tests.integration.conftest import workers  # noqa: F401 - the suite's fixture
from tests.integration.workers import WorkerProcess, start_worker, wait_until
from tests.redis.scratch import worker_env

from conveyor import Conveyor

pytestmark = pytest.mark.slow

# That test counts on one fetch taking every message sent just after the worker started.
# A Redis fetch wakes at the first push and takes what is there; the worker then refills
# only once half its window is free, so the rest wait in Redis. The Redis version below
# queues everything before the worker starts.
NOT_HERE = {"test_prefetched_messages_are_not_lost_when_a_worker_is_killed"}

for _name in dir(suite):
    if _name.startswith("test_") and _name not in NOT_HERE:
        globals()[_name] = getattr(suite, _name)

# The 1,000-part chord with a worker SIGKILLed halfway, counted in Celery's Redis keys.
test_chord_body_runs_exactly_once_when_a_worker_dies = (
    chord_suite.test_chord_body_runs_exactly_once_when_a_worker_dies)


@pytest.fixture
def env(redis_service: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """As the suite's own ``env`` (2 s leases), with Redis for broker and backend."""
    with worker_env(redis_service, monkeypatch, "process-", visibility_timeout=2) as values:
        yield values


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Conveyor]:
    proc_app.app.config_from_object({})
    yield proc_app.app
    proc_app.app.close()


def test_prefetched_messages_are_not_lost_when_a_worker_is_killed_on_redis(
    app: Conveyor,
    env: dict[str, str],
    tmp_path: Path,
    workers: list[WorkerProcess],  # noqa: F811 - the fixture imported above
) -> None:
    log = tmp_path / "record.log"
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
