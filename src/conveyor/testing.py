"""Test doubles that honour the real contracts: in-memory broker and backend, eager mode,
and a worker run in this process until the queues are idle.

    app = testing.memory_app("proj")      # memory:// broker and backend
    add.delay(2, 2)
    testing.run_until_idle(app)            # runs every queued task here, then returns
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from conveyor.app import Conveyor
from conveyor.errors import TimeoutError
from conveyor.worker.worker import Worker

_names = itertools.count(1)


def memory_app(main: str | None = None, **settings: Any) -> Conveyor:
    """An app on a fresh in-memory broker and backend of its own."""
    url = f"memory://test-{next(_names)}"
    return Conveyor(main, broker=url, backend=url, **settings)


def eager_app(main: str | None = None, **settings: Any) -> Conveyor:
    """An app whose ``delay()`` runs tasks in the caller, with errors propagated."""
    settings.setdefault("task_always_eager", True)
    settings.setdefault("task_eager_propagates", True)
    return memory_app(main, **settings)


@contextmanager
def running_worker(
    app: Conveyor,
    queues: Sequence[str] | None = None,
    *,
    pool: str = "threads",
    concurrency: int = 2,
) -> Iterator[Worker]:
    """A worker serving in a thread of this process for the duration of a ``with``."""
    worker = Worker(app, queues=queues, pool=pool, concurrency=concurrency,
                    hostname="testing@%h")
    thread = threading.Thread(target=_serve, args=(worker,), name="conveyor-test-worker",
                              daemon=True)
    worker.start()
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)


def _serve(worker: Worker) -> None:
    try:
        worker.serve()
    finally:
        worker.shutdown()


def run_until_idle(
    app: Conveyor,
    queues: Sequence[str] | None = None,
    *,
    timeout: float = 30.0,
    include_delayed: bool = True,
    pool: str = "threads",
    concurrency: int = 2,
) -> int:
    """Run queued tasks in this process until nothing is left; return how many ran.

    With ``include_delayed`` (default), messages waiting for an eta or a retry countdown
    are waited for too. Raises :class:`conveyor.errors.TimeoutError` after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    with running_worker(app, queues, pool=pool, concurrency=concurrency) as worker:
        names = worker.queue_names
        while True:
            # In-flight first: a job publishes its follow-up (chain step, chord body)
            # before it finishes, so once it is done that message shows in the stats.
            # And again after: a message fetched and early-acked while the stats were
            # read (they take a round trip on a networked broker) shows in neither.
            before = (worker.consumer.inflight, worker.consumer.processed)
            stats = app.broker.stats(names)
            pending = sum(s.ready + s.leased + (s.delayed if include_delayed else 0)
                          for s in stats)
            after = (worker.consumer.inflight, worker.consumer.processed)
            if pending == 0 and before[0] == 0 and after == before:
                return worker.consumer.processed
            if time.monotonic() > deadline:
                raise TimeoutError(f"queues {names} not idle after {timeout}s "
                                   f"({pending} messages left)")
            time.sleep(0.01)
