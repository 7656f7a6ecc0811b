"""Prefork pool: each slot is a child process with a pipe of its own.

Children are forked from a fork server that has imported the app (``-A``) before any
thread exists, so forking is fast and never copies a lock held by a thread. A pipe per
child tells the parent exactly which job each process runs: a child that dies is
reported as a lost job, and a job past its hard time limit is ended by killing its
process, after which a fresh child takes the slot.

Each child holds up to ``jobs_per_child`` jobs: the one it runs and the next, already in
its pipe, so it never idles while the parent turns a result around. A child starts its
next job the moment it reports one, so each report also says which job now runs: early-
ack messages are acked when their job starts, and a job a child never started when it
died goes back to the worker to run elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from conveyor import serialization, states
from conveyor.errors import SoftTimeLimitExceeded
from conveyor.execution import LoopRunner
from conveyor.logs import setup_logging
from conveyor.worker.job import Job, JobResult, WireJob
from conveyor.worker.pools.base import Pool, ResultCallback, StartCallback, _nothing
from conveyor.worker.runner import run_job

if TYPE_CHECKING:
    from conveyor.app import Conveyor

logger = logging.getLogger("conveyor.worker")


def _raise_soft_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def _rss_kib() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the fork server) dies.

    The fork server exits as soon as the worker does, however it died, so a killed
    worker never leaves children running tasks nobody will acknowledge.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _receive(conn: Connection, accept: frozenset[str], pending: deque[Job]) -> bool:
    """Move every job waiting in the pipe into ``pending``; False once told to stop."""
    while conn.poll():
        wire: WireJob | None = conn.recv()
        if wire is None:
            return False
        pending.append(Job.from_wire(wire, accept))
    return True


def _run_one(app: Conveyor, job: Job, loops: LoopRunner) -> JobResult:
    if job.soft_time_limit:
        signal.setitimer(signal.ITIMER_REAL, job.soft_time_limit)
    try:
        return run_job(app, job, loops)
    except Exception as exc:  # report it; a child never dies of a job's trouble
        logging.getLogger("conveyor.worker").exception(
            "Job %s[%s] failed in the pool", job.task_name, job.task_id)
        return JobResult(job.seq, states.FAILURE, reason=repr(exc))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def child_main(app_spec: str, conn: Connection, max_tasks: int | None,
               max_memory_kib: int | None, log_level: int | None) -> None:
    """A child's life: run jobs from the pipe until told to stop or due to retire."""
    from conveyor.cli_app import load_app

    _die_with_parent()
    if log_level is not None:  # the fork server's children start with logging unset
        setup_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides about shutdown
    signal.signal(signal.SIGALRM, _raise_soft_limit)
    app = load_app(app_spec)
    accept = serialization.normalize_accept(app.conf.accept_content)
    loops = LoopRunner()
    pending: deque[Job] = deque()
    done = 0
    open_pipe = True
    try:
        while open_pipe or pending:
            if not pending:
                wire: WireJob | None = conn.recv()
                if wire is None:
                    return
                pending.append(Job.from_wire(wire, accept))
            result = _run_one(app, pending.popleft(), loops)
            done += 1
            retire = bool(max_tasks and done >= max_tasks) or bool(
                max_memory_kib and _rss_kib() > max_memory_kib)
            if open_pipe:
                open_pipe = _receive(conn, accept, pending)
            conn.send((result.to_wire(), retire))
            if retire:
                return  # jobs still pending were never started: the parent reruns them
    except (EOFError, OSError):
        return
    finally:
        loops.close()
        app.close()


@dataclass(eq=False)
class Child:
    process: Any
    conn: Connection
    assigned: list[Job] = field(default_factory=list)
    """Jobs sent to this child, in order; the first is running once ``started`` is set."""
    started: float | None = None
    retiring: bool = False

    @property
    def running(self) -> Job | None:
        return self.assigned[0] if self.assigned and self.started is not None else None


class PreforkPool(Pool):
    name = "prefork"
    supports_time_limits = True
    jobs_per_child = 2

    def __init__(
        self,
        app_spec: str,
        size: int,
        on_result: ResultCallback,
        on_started: StartCallback = _nothing,
        *,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
    ) -> None:
        super().__init__(size, on_result, on_started)
        self.app_spec = app_spec
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        root = logging.getLogger()
        self.log_level = root.level if root.handlers else None
        self._context = multiprocessing.get_context("forkserver")
        module = app_spec.split(":", 1)[0]
        self._context.set_forkserver_preload(["conveyor.worker.pools.prefork", module])
        self._children: list[Child] = []
        self._lock = threading.RLock()
        self._stopping = False
        self._wakeup_r, self._wakeup_w = multiprocessing.Pipe(duplex=False)
        self._supervisor = threading.Thread(target=self._supervise,
                                            name="conveyor-prefork", daemon=True)

    # -- children ------------------------------------------------------------------------
    def _spawn(self) -> Child:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=child_main,
            args=(self.app_spec, child_conn, self.max_tasks_per_child,
                  self.max_memory_per_child, self.log_level),
            name="conveyor-child",
            daemon=True,
        )
        process.start()
        child_conn.close()
        child = Child(process, parent_conn)
        self._children.append(child)
        return child

    def _ensure_size(self) -> None:
        with self._lock:
            if self._stopping:
                return
            active = [c for c in self._children if not c.retiring]
            for _ in range(self.target_size - len(active)):
                self._spawn()
            surplus = len(active) - self.target_size
            for child in active:
                if surplus <= 0:
                    break
                if not child.assigned:
                    self._retire(child)
                    surplus -= 1

    def _retire(self, child: Child) -> None:
        child.retiring = True
        with contextlib.suppress(OSError):
            child.conn.send(None)

    def _remove(self, child: Child) -> None:
        with self._lock:
            if child not in self._children:
                return  # the supervisor and stop() may both get here
            self._children.remove(child)
        child.conn.close()
        child.process.join(timeout=1)

    def start(self) -> None:
        self._ensure_size()
        self._supervisor.start()

    # -- the contract --------------------------------------------------------------------
    def apply(self, job: Job) -> bool:
        with self._lock:
            # An idle child first (the job starts now), else one with room in its queue.
            candidates = sorted((c for c in self._children
                                 if len(c.assigned) < self.jobs_per_child
                                 and not c.retiring and c.process.is_alive()),
                                key=lambda c: len(c.assigned))
            for child in candidates:
                try:
                    child.conn.send(job.to_wire())
                except OSError:
                    continue
                child.assigned.append(job)
                starts_now = len(child.assigned) == 1
                if starts_now:
                    child.started = time.monotonic()
                break
            else:
                return False
        if starts_now:
            self.on_started(job)
        return True

    def free_slots(self) -> int:
        with self._lock:
            return sum(self.jobs_per_child - len(c.assigned) for c in self._children
                       if not c.retiring)

    def size(self) -> int:
        with self._lock:
            return sum(1 for c in self._children if not c.retiring)

    def running(self) -> list[Job]:
        with self._lock:
            return [job for c in self._children for job in c.assigned]

    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self._children]

    def grow(self, n: int = 1) -> None:
        with self._lock:
            self.target_size += n
        self._poke()

    def shrink(self, n: int = 1) -> None:
        with self._lock:
            self.target_size = max(1, self.target_size - n)
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            self._wakeup_w.send_bytes(b"!")

    # -- supervision ---------------------------------------------------------------------
    def _next_deadline(self) -> float | None:
        deadlines = [c.started + c.assigned[0].time_limit for c in self._children
                     if c.running is not None and c.started is not None
                     and c.assigned[0].time_limit]
        return min(deadlines) if deadlines else None

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._stopping and not self._children:
                    return
                children = list(self._children)
                deadline = self._next_deadline()
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            handles: list[Any] = [self._wakeup_r]
            for child in children:
                handles.extend((child.conn, child.process.sentinel))
            ready = wait(handles, timeout)
            if self._wakeup_r in ready:
                while self._wakeup_r.poll():
                    self._wakeup_r.recv_bytes()
            for child in children:
                if child.conn in ready:
                    self._read(child)
            for child in children:
                if child.process.sentinel in ready or not child.process.is_alive():
                    self._reap(child)
            self._enforce_time_limits()
            self._ensure_size()

    def _read(self, child: Child) -> bool:
        """Take one report from a child's pipe; False once the pipe is closed."""
        try:
            wire, retire = child.conn.recv()
        except (EOFError, OSError):
            return False
        result = JobResult.from_wire(wire)
        with self._lock:
            # By seq: a result may race the kill of its job at the hard time limit.
            job = next((j for j in child.assigned if j.seq == result.seq), None)
            if job is not None:
                child.assigned.remove(job)
            # A child starts its next job the moment it reports one, unless it retires.
            next_job = child.assigned[0] if child.assigned and not retire else None
            child.started = time.monotonic() if next_job is not None else None
            if retire:
                child.retiring = True
        if job is not None:
            self.on_result(job, result)
        if next_job is not None:
            self.on_started(next_job)
        return True

    def _reap(self, child: Child) -> None:
        # Drain the reports the child sent just before exiting; what is left was lost.
        while child.assigned and child.conn.poll():
            if not self._read(child):
                break
        with self._lock:
            lost = child.running
            never_started = child.assigned[1:] if lost is not None else list(child.assigned)
            child.assigned = []
            child.started = None
        self._remove(child)
        if lost is not None:
            code = child.process.exitcode
            logger.error("Process %s running %s[%s] exited with code %s",
                         child.process.pid, lost.task_name, lost.task_id, code)
            self.on_result(lost, JobResult(lost.seq, states.FAILURE,
                                           extra={"lost": True, "exitcode": code}))
        elif not child.retiring and not self._stopping:
            logger.warning("Idle process %s exited with code %s; replacing it",
                           child.process.pid, child.process.exitcode)
        for job in never_started:
            self.on_result(job, JobResult(job.seq, states.PENDING,
                                          extra={"not_started": True}))

    def _enforce_time_limits(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [c for c in self._children if c.running is not None
                       and c.started is not None and c.assigned[0].time_limit
                       and now >= c.started + c.assigned[0].time_limit]
            for child in expired:
                child.retiring = True
        for child in expired:
            with self._lock:
                job = child.assigned.pop(0)
                child.started = None
            logger.error("Task %s[%s] hit its hard time limit (%ss); killing process %s",
                         job.task_name, job.task_id, job.time_limit, child.process.pid)
            child.process.kill()
            self.on_result(job, JobResult(job.seq, states.FAILURE,
                                          extra={"time_limit": job.time_limit}))
            self._reap(child)  # the jobs queued behind it run elsewhere

    def stop(self, *, graceful: bool, timeout: float | None = None) -> list[Job]:
        with self._lock:
            self._stopping = True
            children = list(self._children)
        if graceful:
            deadline = None if timeout is None else time.monotonic() + timeout
            while any(c.assigned for c in children):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        unfinished = [job for c in children for job in c.assigned]
        for child in children:
            if not child.assigned and graceful:
                self._retire(child)
            else:
                child.assigned = []
                child.process.kill()
        for child in children:
            child.process.join(timeout=5)
            if child.process.is_alive():
                os.kill(child.process.pid, signal.SIGKILL)
                child.process.join(timeout=1)
        for child in children:
            self._remove(child)
        self._poke()
        self._supervisor.join(timeout=5)
        self._wakeup_r.close()
        self._wakeup_w.close()
        return unfinished
