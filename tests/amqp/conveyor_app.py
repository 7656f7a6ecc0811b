"""The Conveyor side of the AMQP interop tests: ``conveyor -A tests.amqp.conveyor_app worker``.

The same task names and behaviour as :mod:`tests.amqp.celery_app`. ``register`` adds them
to any app, so in-process tests can build an app per test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.amqp.interop_errors import InteropError
from tests.amqp.interop_settings import MAX_PRIORITY, PRIORITY_QUEUE, interop_settings

from conveyor import Conveyor, Exchange, Queue

WORKER_KIND = "conveyor"


def register(app: Conveyor) -> None:
    @app.task(name="interop.add")
    def add(x: Any, y: Any) -> Any:
        return x + y

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

    @app.task(name="interop.record")
    def record(path: str, n: Any) -> Any:
        with Path(path).open("a") as handle:
            handle.write(f"{n} {WORKER_KIND}\n")
        return n

    @app.task(name="interop.note")
    def note(value: Any, path: str) -> Any:
        with Path(path).open("a") as handle:
            handle.write(f"{value} {WORKER_KIND}\n")
        return value

    @app.task(name="interop.errback")
    def errback(task_id: str) -> str:
        # Old-style errback (the failed task's id only); where to write comes from the
        # environment, which both kinds of worker share with the test.
        with (Path(os.environ["INTEROP_RECORD_DIR"]) / "errbacks.log").open("a") as handle:
            handle.write(f"errback {task_id} {WORKER_KIND}\n")
        return task_id

    @app.task(name="interop.late_record", acks_late=True)
    def late_record(path: str, n: int, seconds: float = 0.0) -> int:
        time.sleep(seconds)
        with Path(path).open("a") as handle:
            handle.write(f"{n} {WORKER_KIND}\n")
        return n


def register_process_killers(app: Conveyor) -> None:
    """Late-ack tasks whose process ends under them (Conveyor's prefork tests only)."""

    @app.task(name="interop.late_die", acks_late=True)
    def late_die(path: str) -> None:
        with Path(path).open("a") as handle:
            handle.write("run\n")
        os._exit(3)

    @app.task(name="interop.late_overrun", acks_late=True, time_limit=1.0)
    def late_overrun(path: str) -> None:
        with Path(path).open("a") as handle:
            handle.write("run\n")
        time.sleep(60)


def make_app(**overrides: Any) -> Conveyor:
    settings = {**interop_settings(), **overrides}
    instance = Conveyor(
        "interop",
        broker=settings.pop("broker_url"),
        backend=settings.pop("result_backend"),
        task_queues=[
            Queue("celery", Exchange("celery", "direct"), "celery"),
            Queue(
                PRIORITY_QUEUE,
                Exchange(PRIORITY_QUEUE, "direct"),
                PRIORITY_QUEUE,
                max_priority=MAX_PRIORITY,
            ),
        ],
        **settings,
    )
    register(instance)
    register_process_killers(instance)
    return instance


app = make_app()
