"""The pool contract.

A pool runs each :class:`Job` it is given on one of its slots and reports, from any
thread, ``on_started(job)`` when the job really starts (early-ack messages are acked
then) and a :class:`JobResult` through ``on_result``. The worker only calls ``apply``
when ``free_slots() > 0``. Pools that run jobs in other processes report a job whose
process died with ``extra={"lost": True}``, one killed at its hard time limit with
``extra={"time_limit": seconds}`` (the worker stores those failures), and one handed
to a process that ended before starting it with ``extra={"not_started": True}`` (the
worker runs it elsewhere).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from conveyor.worker.job import Job, JobResult

ResultCallback = Callable[[Job, JobResult], None]
StartCallback = Callable[[Job], None]


def _nothing(job: Job) -> None:
    """Default ``on_started``: a pool used without a worker."""


class Pool(ABC):
    name: str = ""
    supports_time_limits: bool = False

    def __init__(self, size: int, on_result: ResultCallback,
                 on_started: StartCallback = _nothing) -> None:
        self.target_size = max(1, size)
        self.on_result = on_result
        self.on_started = on_started

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def apply(self, job: Job) -> bool:
        """Start ``job`` on a free slot; False if no slot could take it after all."""

    @abstractmethod
    def free_slots(self) -> int: ...

    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def running(self) -> list[Job]: ...

    def grow(self, n: int = 1) -> None:
        self.target_size += n

    def shrink(self, n: int = 1) -> None:
        self.target_size = max(1, self.target_size - n)

    @abstractmethod
    def stop(self, *, graceful: bool, timeout: float | None = None) -> list[Job]:
        """Stop the pool. Graceful: let running jobs finish (up to ``timeout``).
        Returns the jobs that were still running when it stopped."""
