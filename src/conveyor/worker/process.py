"""One process of the prefork pool: a one-slot worker that consumes from the broker itself.

Each process fetches, checks, runs and settles its own messages with the same steps as
every other worker (:class:`~conveyor.worker.worker.Worker`), so no message crosses a
pipe and the supervisor never stands between the broker and a task. Tasks run in the
main thread, where SIGALRM can raise the soft time limit. What the process holds is
written to its :class:`~conveyor.worker.slot.Slot`: that is how the supervisor fails a
job whose process died or overran its hard time limit, and gives back at once the
messages such a process had fetched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor import states
from conveyor.brokers.idle_gate import IdleGate, remove_gate_directory
from conveyor.execution import LoopRunner
from conveyor.logs import setup_logging
from conveyor.worker.alarm import JobAlarm
from conveyor.worker.forkserver import map_shared_buffer
from conveyor.worker.job import Job, JobResult
from conveyor.worker.pools.base import Pool, ResultCallback, StartCallback
from conveyor.worker.runner import run_job
from conveyor.worker.signal_relay import relay_signals
from conveyor.worker.slot import (
    MASK_BITS,
    SLOT_BYTES,
    Slot,
    Verdict,
    Verdicts,
    delivery_ref,
    lost_sibling_job,
    running_job,
)
from conveyor.worker.worker import FETCH_TIMEOUT, Worker

if TYPE_CHECKING:
    from conveyor.app import Conveyor

logger = logging.getLogger("conveyor.worker")


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """Everything a process needs to become the worker its supervisor runs."""

    app_spec: str
    broker_url: str | None
    queues: list[str] | None
    hostname: str | None
    prefetch_multiplier: int | None
    max_tasks: int | None
    max_memory_kib: int | None
    log_level: int | None
    slots: int
    """How many records the shared board holds (the most processes at once)."""
    idle_gate: str | None = None
    """The directory of the gate through which idle processes take turns listening."""


def rss_kib() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the fork server) dies.

    The fork server outlives the supervisor until its last process has ended, so this
    only matters when the fork server itself is killed: its processes go with it rather
    than run on, unwatched (the supervisor starts a new fork server and new processes).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class InlinePool(Pool):
    """The process's one slot: a job runs in the thread that dispatches it."""

    name = "prefork"
    supports_time_limits = True

    def __init__(self, app: Conveyor, on_result: ResultCallback,
                 on_started: StartCallback, alarm: JobAlarm) -> None:
        super().__init__(1, on_result, on_started)
        self.app = app
        self.alarm = alarm
        self.loops = LoopRunner()
        self._running: Job | None = None

    def start(self) -> None:
        """Nothing to start: the slot is the calling thread."""

    def apply(self, job: Job) -> bool:
        self._running = job
        self.on_started(job)
        broker = self.app.broker
        self.alarm.arm(job.soft_time_limit, broker.idle_wait_kept_until(),
                       broker.hand_over_idle_wait)
        try:
            result = run_job(self.app, job, self.loops)
        except Exception as exc:  # report it; the process never dies of a job's trouble
            logger.exception("Job %s[%s] failed in the pool", job.task_name, job.task_id)
            result = JobResult(job.seq, states.FAILURE, reason=repr(exc))
        finally:
            self.alarm.disarm()
            self._running = None
        self.on_result(job, result)
        return True

    def free_slots(self) -> int:
        return 0 if self._running is not None else 1

    def size(self) -> int:
        return 1

    def running(self) -> list[Job]:
        return [] if self._running is None else [self._running]

    def grow(self, n: int = 1) -> None:
        """One slot per process: the supervisor scales by processes."""

    def shrink(self, n: int = 1) -> None:
        """One slot per process: the supervisor scales by processes."""

    def stop(self, *, graceful: bool, timeout: float | None = None) -> list[Job]:
        self.loops.close()
        return self.running()


class ProcessWorker(Worker):
    """The worker inside one prefork process, reporting to its slot."""

    def __init__(self, app: Conveyor, spec: ProcessSpec, slot: Slot) -> None:
        self.spec = spec
        self.slot = slot
        self._slot_lock = threading.Lock()
        self._positions: dict[str, int] = {}
        # Whether the last fetch got all it asked for (the queue has a backlog), and how
        # many a fetch sent ahead asked for.
        self._backlog = False
        self._asked_ahead = 0
        self.alarm = JobAlarm()
        super().__init__(app, queues=spec.queues, concurrency=1, pool="prefork",
                         hostname=spec.hostname,
                         prefetch_multiplier=spec.prefetch_multiplier)

    def _make_pool(self, name: str, size: int) -> Pool:
        return InlinePool(self.app, self._on_result, self._on_started, self.alarm)

    # -- signals: the supervisor decides, the process obeys --------------------------------
    def _install_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the supervisor's
        relay_signals(self._on_term, signal.SIGTERM)
        self.alarm.install()

    def _on_term(self, signum: int) -> None:
        # Only a flag: the task may be in the middle of a broker call, so this must not
        # touch the broker. Fetching notices within a second.
        self._stopping.set()

    def _announce(self) -> None:
        logger.debug("Process ready for %s", ",".join(self.queue_names))

    # -- fetching in the main thread ----------------------------------------------------------
    def _start_fetching(self) -> None:
        """No fetch thread: the one slot fetches when it has nothing left to run (or
        sends the fetch ahead as its last task starts, see :meth:`_fetch_ahead`).

        A fetch thread would prefetch while the task runs, but it also takes the GIL each
        time the task's own I/O lets it go (a send, a select), and the task then waits
        for it: measured with the harness (a Redis INCR per task, -c 2), the drain went
        from 3,300-3,400/s with the thread to 3,600-4,700/s without it. The prefetch
        window still bounds what a process holds; it is fetched in one batch."""

    def serve(self) -> None:
        consumer = self.consumer
        while not self._stopping.is_set():
            with consumer.lock:
                job = consumer.take_ready() if consumer.ready else None
                room = self.room()
            if job is not None:
                self._start_jobs([job])
            elif room > 0:
                asked = self._asked_ahead or room  # a fetch sent ahead is read first
                self._asked_ahead = 0
                self._backlog = self._fetch_batch(room, FETCH_TIMEOUT) >= asked
            else:
                # The window is full of unacknowledged messages: no look comes soon.
                self.app.broker.hand_over_idle_wait()
                self._stopping.wait(0.05)

    def _announce_stop(self) -> None:
        logger.debug("Process stopped after %d tasks", self.consumer.processed)

    # -- reporting to the slot ---------------------------------------------------------------
    def _fetched(self) -> None:
        consumer = self.consumer
        with consumer.lock:
            held = list(consumer.held.values())
            backlog = len(consumer.ready)
            running = {consumer.held[job.seq].tag for job in self.pool.running()
                       if job.seq in consumer.held}
        tags = {d.tag for d in held}
        acking = [delivery_ref(d) for d in consumer.acker.unsent() if d.tag not in tags]
        positions = {d.tag: i for i, d in enumerate(held)}
        started = sum(1 << positions[tag] for tag in running if positions[tag] < MASK_BITS)
        with self._slot_lock:
            self._positions = positions
            self.slot.write_held([delivery_ref(d) for d in held], acking, backlog, started)

    def _on_started(self, job: Job) -> None:
        with self.consumer.lock:
            delivery = self.consumer.held.get(job.seq)
        super()._on_started(job)  # early ack: acknowledged now
        now = time.monotonic()
        record, deadline = running_job(job, delivery, now)
        with self._slot_lock:
            position = self._positions.get(delivery.tag) if delivery is not None else None
            self.slot.write_running(record, deadline, now, len(self.consumer.ready), position)
        self._fetch_ahead()

    # -- fetching ahead ----------------------------------------------------------------------
    def _fetch_ahead(self) -> None:
        """The job about to run is the last one held: send the next fetch now, so it
        travels while the job runs instead of after it.

        Only while the queue has a backlog (the last fetch got all it asked for): a
        worker that gets one task at a time would send a fetch that finds nothing, on
        the way of that task's round trip. The window bounds it as any fetch (a late-ack
        job keeps its place). With a window of one (``--prefetch-multiplier 1``) or
        prefetch off, nothing is fetched while a job runs: no message waits behind a
        long task. Measured with the harness's drain (Redis, a Redis INCR per task,
        -c 2): 4,200-4,250/s without, 4,600-4,950/s with. Until the reply is read, the
        slot names the fetch, so the supervisor can give back what it took if this
        process dies."""
        if (not self._backlog or not self.app.broker.fetches_ahead
                or self._stopping.is_set() or self.window() <= 1
                or self._retiring_after_this_job()):
            return
        with self.consumer.lock:
            room = 0 if self.consumer.ready else self.room()
        if room <= 0:
            return
        # The acks queued since the acker's last batch go in the same write.
        riders = self.consumer.acker.riders()
        if self.app.broker.fetch_ahead(self.queue_names, room, self._note_unread, riders):
            self._asked_ahead = room
        elif riders is not None:
            riders.done(False)

    def _note_unread(self, fetch_id: str) -> None:
        with self._slot_lock:
            self.slot.write_unread(fetch_id)

    def _collect_ahead(self) -> None:
        """Take in the reply of a fetch sent ahead, if one is pending, from any thread:
        the consumer's lock keeps the dispatch thread from starting one of its jobs
        before the slot lists them."""
        with self.consumer.lock:
            deliveries = self.app.broker.take_ahead()
            if not deliveries:
                return
            for delivery in deliveries:
                if self._stopping.is_set():
                    self.consumer.give_back(delivery, "worker shutting down")
                else:
                    self.consumer.intake(delivery)
            self._fetched()

    def _renew_leases(self) -> None:
        # A long job: the messages fetched ahead must be held (and renewed) like the rest.
        self._collect_ahead()
        super()._renew_leases()

    def _on_result(self, job: Job, result: JobResult) -> None:
        super()._on_result(job, result)
        # The held list keeps this job's message if it was late-acked: a stale entry is
        # harmless, settling a delivery that is gone does nothing.
        with self._slot_lock:
            self.slot.write_idle(self.consumer.processed, time.monotonic(),
                                 len(self.consumer.ready))
        self._retire_if_due()

    def shutdown(self) -> None:
        self._collect_ahead()  # given back below, with whatever else was not started
        super().shutdown()
        self._fetched()  # nothing held any more: the supervisor has nothing to give back

    def _retiring_after_this_job(self) -> bool:
        max_tasks = self.spec.max_tasks or 0
        return max_tasks > 0 and self.consumer.processed + 1 >= max_tasks

    def _retire_if_due(self) -> None:
        spec = self.spec
        done = self.consumer.processed
        if spec.max_tasks and done >= spec.max_tasks:
            logger.info("Process retiring after %d tasks (max-tasks-per-child)", done)
        elif spec.max_memory_kib and rss_kib() > spec.max_memory_kib:
            logger.info("Process retiring at %d KiB (max-memory-per-child %d KiB)",
                        rss_kib(), spec.max_memory_kib)
        else:
            return
        self._stopping.set()  # exit 0 unasked: the supervisor starts a fresh process


def _die_with_supervisor(lifeline: int, gate_directory: str | None) -> None:
    """End this process the moment the supervisor is gone, however it ended.

    The supervisor holds the only writing end of the ``lifeline`` pipe and never writes:
    the read returns only when that end closes. The fork server outlives the supervisor
    while it has processes, so its death cannot be relied on for this. A supervisor
    killed outright could not remove the idle gate's directory: its processes do."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            os.read(lifeline, 1)
        if gate_directory is not None:
            remove_gate_directory(gate_directory)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="conveyor-lifeline", daemon=True).start()


class RedeliveryJudge:
    """What to do with a redelivered message whose process died running it (AMQP).

    The supervisor's verdict, once it has reaped that process; before that, the dead
    process's own record, with the same rules the supervisor applies."""

    def __init__(self, app: Conveyor, verdicts: Verdicts, board: Any, slots: int,
                 mine: int) -> None:
        self.app = app
        self.verdicts = verdicts
        self.board = board
        self.slots = slots
        self.mine = mine

    def __call__(self, task_id: str) -> Verdict | None:
        verdict = self.verdicts.get(task_id)
        if verdict is not None:
            return verdict
        state = lost_sibling_job(self.board, self.slots, self.mine, task_id)
        if state is None or state.running is None:
            return None
        if not state.running.acks_late:
            return True, 1  # acknowledged when it started; the ack died with the process
        task = self.app.tasks.get(state.running.task_name)
        if state.deadline and time.monotonic() >= state.deadline:
            acknowledge = task is None or task.acks_on_failure_or_timeout
        else:
            acknowledge = not (task is not None and task.reject_on_worker_lost)
        return acknowledge, 1


def process_main(spec: ProcessSpec, index: int, board_fd: int, verdicts_fd: int,
                 lifeline: int) -> None:
    """A prefork process's life: load the app, consume until told to stop or retiring.

    ``board_fd`` and ``verdicts_fd`` are the supervisor's shared buffers (every slot, and
    its verdicts), ``lifeline`` the pipe that ends with the supervisor."""
    from conveyor.cli_app import load_app

    _die_with_parent()
    _die_with_supervisor(lifeline, spec.idle_gate)
    board = map_shared_buffer(board_fd, SLOT_BYTES * spec.slots)
    verdicts = map_shared_buffer(verdicts_fd, SLOT_BYTES)
    if spec.log_level is not None:  # the fork server's processes start with logging unset
        setup_logging(spec.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    app = load_app(spec.app_spec)
    if spec.broker_url:
        app.configure(broker_url=spec.broker_url)
    if spec.idle_gate is not None:
        app.broker.share_idle_wait(IdleGate(spec.idle_gate))
    worker = ProcessWorker(app, spec, Slot(board, index))
    if not app.broker.settles_any_delivery:
        worker.consumer.verdict = RedeliveryJudge(app, Verdicts(verdicts), board, spec.slots,
                                                  index)
    try:
        worker.run()
    finally:
        app.close()
