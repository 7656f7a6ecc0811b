"""The in-process worker suite (``tests/integration/test_worker_inprocess.py``) and the
workflow suite (``tests/integration/test_canvas.py``) on Redis.

Their tests are collected here too, so they run with this module's ``app``: the suites'
own app settings, with broker and backend on Redis under a key prefix of their own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from tests.integration import test_canvas as canvas_suite
from tests.integration import test_worker_inprocess as worker_suite
from tests.redis.scratch import delete_prefixed, scratch_prefix

from conveyor import Conveyor, testing

SUITES = {"worker": worker_suite, "canvas": canvas_suite}
# On Redis a countdown task waits *visible* in its queue, so Celery workers can take it
# (see conveyor.brokers.redis); the Redis version of that test is below.
NOT_HERE = {"test_countdown_waits_in_the_broker"}

for _suite_name, _suite in SUITES.items():
    for _name in dir(_suite):
        if _name.startswith("test_") and _name not in NOT_HERE:
            globals()[f"test_{_suite_name}_{_name[5:]}"] = getattr(_suite, _name)


@pytest.fixture
def app(request: pytest.FixtureRequest, redis_service: str) -> Iterator[Conveyor]:
    prefix = scratch_prefix("inprocess-")
    canvas = request.function.__module__ == canvas_suite.__name__
    instance = Conveyor(
        "w" if canvas else "t",
        broker=redis_service,
        backend=redis_service,
        broker_transport_options={"visibility_timeout": 5, "global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
    )
    if canvas:
        canvas_suite.register(instance)
        canvas_suite.ERRBACK_CALLS.clear()
    yield instance
    instance.close()
    delete_prefixed(redis_service, prefix)


def test_countdown_waits_in_the_queue_for_celery_and_in_redis_for_us(app: Conveyor) -> None:
    worker_suite.register(app)
    sent = time.monotonic()
    result = app.tasks["t.add"].apply_async((2, 2), countdown=0.6)
    stats = app.broker.stats(["celery"])[0]
    assert (stats.ready, stats.delayed) == (1, 0)  # where a Celery worker would see it
    testing.run_until_idle(app, timeout=20)
    assert result.get(timeout=5) == 4
    assert time.monotonic() - sent >= 0.55
