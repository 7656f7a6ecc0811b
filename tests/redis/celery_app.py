"""The real Celery side of the interop tests: ``celery -A tests.redis.celery_app worker``.

Task names and behaviour match :mod:`tests.redis.conveyor_app` exactly, so either kind of
worker can run what either kind of producer sends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from celery import Celery
from tests.redis.interop_errors import InteropError
from tests.redis.interop_settings import interop_settings

WORKER_KIND = "celery"

app = Celery("interop")
app.conf.update(interop_settings(), task_acks_late=False, worker_hijack_root_logger=False)


@app.task(name="interop.add")
def add(x: Any, y: Any) -> Any:
    return x + y


@app.task(name="interop.xsum")
def xsum(values: list[Any]) -> Any:
    return sum(values)


@app.task(name="interop.echo")
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="interop.length")
def length(text: str) -> int:
    return len(text)


@app.task(name="interop.fail")
def fail(kind: str) -> None:
    if kind == "value":
        raise ValueError("boom ✗")
    raise InteropError("custom", 42)


@app.task(name="interop.retry_once", bind=True, max_retries=3)
def retry_once(self: Any) -> str:
    if self.request.retries == 0:
        raise self.retry(countdown=0.3)
    return f"retried {self.request.retries}"


@app.task(name="interop.errback")
def errback(task_id: str) -> str:
    return f"errback for {task_id}"


@app.task(name="interop.record")
def record(path: str, n: int) -> int:
    with Path(path).open("a") as handle:
        handle.write(f"{n} {WORKER_KIND}\n")
    return n


@app.task(name="interop.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
