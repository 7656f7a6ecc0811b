"""The Conveyor side of the interop tests: ``conveyor -A tests.redis.conveyor_app worker``.

The same task names and behaviour as :mod:`tests.redis.celery_app`. ``register`` adds
them to any app, so in-process tests can build an app per test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.redis.interop_errors import InteropError
from tests.redis.interop_settings import interop_settings

from conveyor import Conveyor

WORKER_KIND = "conveyor"


def register(app: Conveyor) -> None:
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
            self.retry(countdown=0.3)
        return f"retried {self.request.retries}"

    @app.task(name="interop.errback")
    def errback(task_id: str) -> str:
        return f"errback for {task_id}"

    @app.task(name="interop.record")
    def record(path: str, n: int) -> int:
        with Path(path).open("a") as handle:
            handle.write(f"{n} {WORKER_KIND}\n")
        return n

    @app.task(name="interop.late_record", acks_late=True)
    def late_record(path: str, n: int, seconds: float = 0.0) -> int:
        time.sleep(seconds)
        with Path(path).open("a") as handle:
            handle.write(f"{n} {WORKER_KIND}\n")
        return n

    @app.task(name="interop.sleep")
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def make_app(**overrides: Any) -> Conveyor:
    settings = {**interop_settings(), **overrides}
    instance = Conveyor(
        "interop",
        broker=settings.pop("broker_url"),
        backend=settings.pop("result_backend"),
        **settings,
    )
    register(instance)
    return instance


app = make_app()
