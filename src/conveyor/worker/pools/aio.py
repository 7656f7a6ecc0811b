"""The asyncio pool (``-P asyncio``): many tasks at once on one event loop.

``async def`` tasks run natively on the loop, up to ``concurrency`` at a time, so a
worker waiting on I/O holds hundreds of tasks with one thread. Sync tasks given to this
pool run in the loop's worker threads, so they never block it. Hard time limits can't
be enforced here (nothing can stop a running coroutine that never yields); soft limits
are not raised either. Use prefork when you need them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

from conveyor import states
from conveyor.execution import LoopRunner
from conveyor.worker.job import Job, JobResult
from conveyor.worker.pools.base import Pool, ResultCallback, StartCallback, _nothing
from conveyor.worker.runner import arun_job

if TYPE_CHECKING:
    from conveyor.app import Conveyor

logger = logging.getLogger("conveyor.worker")


class AsyncioPool(Pool):
    name = "asyncio"

    def __init__(self, app: Conveyor, size: int, on_result: ResultCallback,
                 on_started: StartCallback = _nothing) -> None:
        super().__init__(size, on_result, on_started)
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="conveyor-asyncio",
                                        daemon=True)
        self._lock = threading.Lock()
        self._running: dict[int, Job] = {}
        self._futures: dict[int, Future[None]] = {}
        self._loops = LoopRunner()  # for the sync tasks' threads

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> None:
        self._thread.start()

    async def _run(self, job: Job) -> None:
        try:
            result = await arun_job(self.app, job, self._loops)
        except BaseException as exc:  # report, never lose the job
            logger.exception("Job for %s crashed the asyncio pool", job.task_name)
            result = JobResult(job.seq, states.FAILURE, reason=repr(exc))
        with self._lock:
            self._running.pop(job.seq, None)
            self._futures.pop(job.seq, None)
        self.on_result(job, result)

    def apply(self, job: Job) -> bool:
        with self._lock:
            if len(self._running) >= self.target_size:
                return False
            self._running[job.seq] = job
            self._futures[job.seq] = asyncio.run_coroutine_threadsafe(self._run(job),
                                                                      self._loop)
        self.on_started(job)
        return True

    def free_slots(self) -> int:
        with self._lock:
            return max(0, self.target_size - len(self._running))

    def size(self) -> int:
        return self.target_size

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def stop(self, *, graceful: bool, timeout: float | None = None) -> list[Job]:
        with self._lock:
            futures = list(self._futures.values())
        if graceful and futures:
            wait(futures, timeout)  # each job reports its own outcome through on_result
        unfinished = self.running()
        for future in futures:
            future.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()
        self._loops.close()
        return unfinished
