"""Timing, counting and memory helpers: worker processes, the execution counter, RSS.

Everything here measures from outside, as a user would see it: a worker is a command
started with ``subprocess``, its progress is the Redis counter its tasks increment, and
its memory is what ``psutil`` reads for its process tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

import redis

POLL_SECONDS = 0.002  # the counter is read this often: the resolution of every time here
RSS_SAMPLE_SECONDS = 0.05
STOP_GRACE_SECONDS = 15.0  # warm shutdown first; SIGKILL only after this


class BenchError(RuntimeError):
    """A cell failed: reported as ``n/a (error: ...)``, never raised out of the run."""


# -- statistics -----------------------------------------------------------------------------

def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile, interpolated between the nearest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), len(values))


# -- the execution counter --------------------------------------------------------------------

class Counter:
    """The Redis key every counted task INCRs once."""

    def __init__(self, url: str, key: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.key = key

    def reset(self) -> None:
        self.client.delete(self.key)

    def value(self) -> int:
        raw = self.client.get(self.key)
        return int(raw) if raw is not None else 0


# -- memory ---------------------------------------------------------------------------------

def tree_rss(root: psutil.Process) -> int:
    """Bytes of RSS of a process and all its descendants (shared pages count in each)."""
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue  # a child that exited between the listing and the reading
    return total


class RssSampler:
    """Samples a process tree's RSS every 50 ms in a thread; ``peak`` is the largest."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.root))
            self._stop.wait(RSS_SAMPLE_SECONDS)


# -- worker processes -------------------------------------------------------------------------

@dataclass
class WorkerProcess:
    """A worker command running in its own session, its output in a log file."""

    command: list[str]
    env: Mapping[str, str]
    cwd: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> float:
        """Start the command; returns the ``perf_counter`` time just before ``Popen``."""
        log = self.log_path.open("ab")
        self._log = log
        self.started_at = time.perf_counter()
        # A session of its own, so stop() can reach every process the worker forked.
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=dict(self.env), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.started_at

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exited(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self) -> None:
        """SIGTERM (a warm shutdown in all three systems), then SIGKILL after a grace."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_GRACE_SECONDS)
        # Whatever is left of the session (children of a killed parent, a stuck parent)
        # goes now: the next measurement must have the machine to itself.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log = self._log
        if log is not None:
            log.close()
            self._log = None


@dataclass(frozen=True)
class Drained:
    """One timed run of a worker over a queue filled beforehand."""

    startup: float  # start of the command -> the first execution
    total: float  # start of the command -> the last execution
    count: int
    peak_rss: int  # bytes, worker parent plus children

    @property
    def rate_with_startup(self) -> float:
        return self.count / self.total

    @property
    def rate_without_startup(self) -> float:
        # count - 1 intervals lie between the first and the last execution.
        span = self.total - self.startup
        return (self.count - 1) / span if span > 0 else float("inf")


def drain(worker: WorkerProcess, counter: Counter, target: int, timeout: float) -> Drained:
    """Start ``worker`` and poll the counter until ``target`` executions were counted.

    The worker is left running (idle) for whatever comes next; the caller stops it.
    """
    started = worker.start()
    first: float | None = None
    deadline = started + timeout
    with RssSampler(worker.pid) as sampler:
        while True:
            done = counter.value()
            now = time.perf_counter()
            if done > 0 and first is None:
                first = now
            if done >= target:
                break
            if worker.exited() is not None:
                raise BenchError(f"worker exited with code {worker.exited()} after "
                                 f"{done}/{target} tasks: {worker.log_tail()}")
            if now > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s with {done}/{target} "
                                 f"tasks done: {worker.log_tail()}")
            time.sleep(POLL_SECONDS)
        # One more sample at the end: a short smoke drain may finish between samples.
        peak = max(sampler.peak, tree_rss(sampler.root))
    if done > target:
        raise BenchError(f"{done} executions counted for {target} tasks sent "
                         "(leftovers from another run in the queue?)")
    assert first is not None
    return Drained(startup=first - started, total=now - started, count=target,
                   peak_rss=peak)
