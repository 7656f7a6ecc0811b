"""The real Celery side of the AMQP interop tests: ``celery -A tests.amqp.celery_app worker``.

Task names and behaviour match :mod:`tests.amqp.conveyor_app`, so either kind of worker
runs what either kind of producer sends. The queues are declared as the Conveyor app
declares them (``celery``, and ``prio`` with ``x-max-priority``), so neither side's
declaration makes RabbitMQ refuse the other's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from tests.amqp.interop_errors import InteropError
from tests.amqp.interop_settings import MAX_PRIORITY, PRIORITY_QUEUE, interop_settings

WORKER_KIND = "celery"


def celery_settings() -> dict[str, Any]:
    """This app's settings, read from the environment now (the test client uses them too)."""
    return {
        **interop_settings(),
        "task_acks_late": False,
        "worker_hijack_root_logger": False,
        "task_queues": [
            Queue("celery", Exchange("celery", "direct"), routing_key="celery"),
            Queue(
                PRIORITY_QUEUE,
                Exchange(PRIORITY_QUEUE, "direct"),
                routing_key=PRIORITY_QUEUE,
                max_priority=MAX_PRIORITY,
            ),
        ],
    }


app = Celery("interop")
app.conf.update(celery_settings())


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
        raise self.retry(countdown=0.3)
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
