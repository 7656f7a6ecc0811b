"""Tasks of ``redis_bench.py`` for Conveyor: ``conveyor -A redis_bench_app worker`` (run in
``bench/``). Broker and backend come from ``REDIS_BENCH_URL``."""

from __future__ import annotations

import os

from conveyor import Conveyor

URL = os.environ.get("REDIS_BENCH_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("REDIS_BENCH_PREFIX", "redis-bench:")

app = Conveyor(
    "bench",
    broker=URL,
    backend=URL,
    result_expires=600,
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
)


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    return None


@app.task(name="bench.add")
def add(x: int, y: int) -> int:
    return x + y
