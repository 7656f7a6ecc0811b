"""The same tasks for Celery: ``celery -A redis_bench_celery worker`` (run in ``bench/``)."""

from __future__ import annotations

import os

from celery import Celery

URL = os.environ.get("REDIS_BENCH_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("REDIS_BENCH_PREFIX", "redis-bench:")

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
)


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    return None


@app.task(name="bench.add")
def add(x: int, y: int) -> int:
    return x + y
