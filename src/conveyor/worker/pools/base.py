"""The pool contract.

A pool runs each :class:`Job` it is given on one of its slots and reports a
:class:`JobResult` through ``on_result``, from any thread. The worker only calls
``apply`` when ``free_slots() > 0``. Pools that run jobs in other processes report a
job whose process died with ``extra={"lost": True}``, and one killed at its hard time
limit with ``extra={"time_limit": seconds}``: the worker stores those failures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from conveyor.worker.job import Job, JobResult

ResultCallback = Callable[[Job, JobResult], None]


class Pool(ABC):
    name: str = ""
    supports_time_limits: bool = False

    def __init__(self, size: int, on_result: ResultCallback) -> None:
        self.target_size = max(1, size)
        self.on_result = on_result

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
