"""Threads pool (``-P threads``) and the solo pool (``-P solo``: one thread).

Jobs run in worker threads of this process, each thread with its own event loop for
``async def`` tasks. Hard time limits can't be enforced on a thread (nothing can kill
one), so only processes pools support them.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

from conveyor import states
from conveyor.execution import LoopRunner
from conveyor.worker.job import Job, JobResult
from conveyor.worker.pools.base import Pool, ResultCallback, StartCallback, _nothing
from conveyor.worker.runner import run_job

if TYPE_CHECKING:
    from conveyor.app import Conveyor

logger = logging.getLogger("conveyor.worker")


class ThreadsPool(Pool):
    name = "threads"

    def __init__(self, app: Conveyor, size: int, on_result: ResultCallback,
                 on_started: StartCallback = _nothing) -> None:
        super().__init__(size, on_result, on_started)
        self.app = app
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._running: dict[int, Job] = {}
        self._idle = 0
        self._retire = 0

    def start(self) -> None:
        with self._lock:
            self._adjust()

    def _adjust(self) -> None:
        alive = [t for t in self._threads if t.is_alive()]
        self._threads = alive
        missing = self.target_size - (len(alive) - self._retire)
        for _ in range(max(0, missing)):
            thread = threading.Thread(target=self._serve, name=f"conveyor-{self.name}",
                                      daemon=True)
            self._threads.append(thread)
            self._idle += 1
            thread.start()
        for _ in range(max(0, -missing)):
            self._retire += 1
            self._jobs.put(None)

    def _serve(self) -> None:
        loops = LoopRunner()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    with self._lock:
                        self._retire = max(0, self._retire - 1)
                        self._idle -= 1
                    return
                try:
                    result = run_job(self.app, job, loops)
                except BaseException as exc:
                    logger.exception("Job for %s crashed the pool thread", job.task_name)
                    result = JobResult(job.seq, states.FAILURE, reason=repr(exc))
                with self._lock:
                    self._running.pop(job.seq, None)
                    self._idle += 1
                self.on_result(job, result)
        finally:
            loops.close()

    def apply(self, job: Job) -> bool:
        with self._lock:
            if self._idle - self._retire <= 0:
                return False
            self._idle -= 1
            self._running[job.seq] = job
        self._jobs.put(job)
        self.on_started(job)  # an idle thread takes it now
        return True

    def free_slots(self) -> int:
        with self._lock:
            return max(0, self._idle - self._retire)

    def size(self) -> int:
        with self._lock:
            return len(self._threads) - self._retire

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def grow(self, n: int = 1) -> None:
        with self._lock:
            self.target_size += n
            self._adjust()

    def shrink(self, n: int = 1) -> None:
        with self._lock:
            self.target_size = max(1, self.target_size - n)
            self._adjust()

    def stop(self, *, graceful: bool, timeout: float | None = None) -> list[Job]:
        with self._lock:
            threads = list(self._threads)
            for _ in threads:
                self._jobs.put(None)
        if graceful:
            for thread in threads:
                thread.join(timeout)
        return self.running()


class SoloPool(ThreadsPool):
    name = "solo"

    def __init__(self, app: Conveyor, size: int, on_result: ResultCallback,
                 on_started: StartCallback = _nothing) -> None:
        super().__init__(app, 1, on_result, on_started)

    def grow(self, n: int = 1) -> None:
        """The solo pool has exactly one slot."""

    def shrink(self, n: int = 1) -> None:
        """The solo pool has exactly one slot."""
