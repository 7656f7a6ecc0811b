"""The prefork pool: a supervisor and processes that each consume from the broker.

Each process is a one-slot worker (:mod:`conveyor.worker.process`) with its own broker
connection: it fetches, runs and settles its own messages, so a task never waits for a
hand-off through this process. The supervisor only keeps the processes alive:

* it starts them from a fork server (:mod:`conveyor.worker.forkserver`) that has imported
  the app before any thread exists, so starting one is fast and never copies a lock a
  thread held;
* it replaces a process that died, retired (``--max-tasks-per-child``,
  ``--max-memory-per-child``) or was killed at a task's hard time limit;
* it fails the job a dead or killed process was running and gives back at once the
  messages it had fetched, from what the process wrote to its slot (brokers where only
  the receiving connection can settle a delivery, AMQP, requeue them by themselves);
* it grows and shrinks the number of processes (``--autoscale``);
* on the first SIGTERM/SIGINT it asks every process for a warm shutdown (finish the
  running task, give prefetched messages back); on a second one it kills them and gives
  back the late-ack messages they were running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from conveyor.brokers.idle_gate import create_gate_directory, remove_gate_directory
from conveyor.errors import BrokerError, ConfigurationError
from conveyor.request import Request, request_context
from conveyor.urls import redact_url
from conveyor.worker.autoscale import AutoscalePolicy
from conveyor.worker.consumer import Consumer
from conveyor.worker.forkserver import ForkedProcess, ForkServer, shared_buffer
from conveyor.worker.process import ProcessSpec, process_main
from conveyor.worker.signal_relay import relay_signals
from conveyor.worker.slot import (
    SLOT_BYTES,
    RunningJob,
    Slot,
    SlotState,
    TornSlot,
    Verdicts,
    delivery_from_ref,
)
from conveyor.worker.worker import declare_queues, expand_hostname, starting_size

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.envelope import Delivery

logger = logging.getLogger("conveyor.worker")

TURN = 0.5
"""Longest wait between two looks at the processes (deadlines, autoscale)."""
RESPAWN_MAX_DELAY = 30.0


def _as_request(running: RunningJob) -> contextlib.AbstractContextManager[Request]:
    """Store a lost job's failure as its own process would have (rpc:// replies to the
    caller named in the message, which only the process saw)."""
    return request_context(Request(
        id=running.task_id, task=running.task_name, reply_to=running.reply_to,
        correlation_id=running.correlation_id, called_directly=False))


@dataclass(eq=False)
class Child:
    process: ForkedProcess
    slot: Slot
    started_at: float
    asked_to_stop: bool = False
    overran: RunningJob | None = None
    """The job it was killed for, at that job's hard time limit."""


class Supervisor:
    """``conveyor worker -P prefork``: runs and watches the consuming processes."""

    def __init__(
        self,
        app: Conveyor,
        *,
        app_spec: str | None,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        hostname: str | None = None,
        autoscale: AutoscalePolicy | None = None,
        prefetch_multiplier: int | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        broker_url: str | None = None,
    ) -> None:
        if app_spec is None:
            raise ConfigurationError(
                "the prefork pool starts processes that import the app: give its "
                "import path (-A module:app), or use pool='threads' or 'solo'")
        broker = app.broker
        if not broker.shared_between_processes:
            raise ConfigurationError(
                f"the {broker.scheme}:// broker lives inside one process, so the prefork "
                "pool's processes could not share its queues: use -P threads, asyncio or "
                "solo")
        conf = app.conf
        self.app = app
        self.hostname = expand_hostname(hostname)
        self.queues = app.router.consumed_queues(queues)
        self.queue_names = [q.name for q in self.queues]
        self.autoscale = autoscale
        self.target = starting_size(conf, concurrency, autoscale)
        root = logging.getLogger()
        self.spec = ProcessSpec(
            app_spec=app_spec,
            broker_url=broker_url,
            queues=self.queue_names,
            hostname=hostname,
            prefetch_multiplier=prefetch_multiplier,
            max_tasks=max_tasks_per_child or conf.worker_max_tasks_per_child,
            max_memory_kib=max_memory_per_child or conf.worker_max_memory_per_child,
            log_level=root.level if root.handlers else None,
            # Processes asked to stop keep their record until they exit, while their
            # replacements start: twice the most that may run at once.
            slots=2 * max(self.target, autoscale.maximum if autoscale is not None else 0),
        )
        # Stores the failures of jobs whose process died and settles what it held.
        self.settler = Consumer(app, self.hostname)
        self._fork_server = ForkServer(["conveyor.worker.process", app_spec.split(":", 1)[0]])
        self._children: list[Child] = []
        # One record per process that can run at once; pages never touched cost nothing.
        self._board_fd, self._board = shared_buffer(SLOT_BYTES * self.spec.slots)
        self._verdicts_fd, verdicts_buffer = shared_buffer(SLOT_BYTES)
        self._verdicts = Verdicts(verdicts_buffer)
        self._stopping = threading.Event()
        self._cold = threading.Event()
        self._signals = 0
        # Never written: the processes watch it to end with this one (see process.py).
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._respawn_delay = 0.0
        self._respawn_after = 0.0
        self._idle_since = time.monotonic()
        self._last_scale = 0.0
        self._gate_directory: str | None = None
        self.processed = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        """Start the processes and watch them until shut down (blocks)."""
        if threading.current_thread() is threading.main_thread():
            relay_signals(self._on_signal, signal.SIGTERM, signal.SIGINT)
        try:
            self.start()
            self.serve()
        finally:
            self.shutdown()

    def start(self) -> None:
        declare_queues(self.app.broker, self.queues, self._stopping)
        self._gate_directory = create_gate_directory()
        self.spec = dataclasses.replace(self.spec, idle_gate=self._gate_directory)
        for _ in range(self.target):
            self._spawn()
        logger.info("%s ready: pool=prefork concurrency=%s queues=%s broker=%s",
                    self.hostname, self.target, ",".join(self.queue_names),
                    redact_url(self.app.conf.broker_url))

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.warning("Warm shutdown (%s): finishing running tasks; signal again "
                           "for a cold shutdown", signal.Signals(signum).name)
        else:
            logger.warning("Cold shutdown: stopping running tasks now")
            self._cold.set()
        self._stopping.set()
        self._poke()

    def stop(self, *, cold: bool = False) -> None:
        if cold:
            self._cold.set()
        self._stopping.set()
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"!")

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self) -> None:
        taken = {child.slot.index for child in self._children}
        index = next(i for i in range(self.spec.slots) if i not in taken)
        slot = Slot(self._board, index)
        slot.clear()
        process = self._fork_server.start_process(
            process_main, (self.spec, index),
            [self._board_fd, self._verdicts_fd, self._lifeline_r])
        self._children.append(Child(process, slot, time.monotonic()))

    def _ensure_size(self, now: float) -> None:
        missing = self.target - sum(1 for c in self._children if not c.asked_to_stop)
        if missing <= 0 or now < self._respawn_after:
            return
        for _ in range(min(missing, self.spec.slots - len(self._children))):
            try:
                self._spawn()
            except OSError as exc:  # no memory or processes left to fork: try again later
                logger.error("Could not start a process (%s); next try in %.0fs", exc,
                             self._delay_respawns(now))
                return

    def _ask_to_stop(self, child: Child) -> None:
        child.asked_to_stop = True
        with contextlib.suppress(OSError):
            child.process.terminate()  # SIGTERM: the process's own warm shutdown

    # -- watching ----------------------------------------------------------------------------
    def serve(self) -> None:
        while not self._stopping.is_set():
            self._turn()

    def _turn(self) -> None:
        handles: list[Any] = [self._wake_r, *(c.process.sentinel for c in self._children)]
        ready = wait(handles, self._wait_time())
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 512)
        for child in list(self._children):
            if child.process.sentinel in ready or not child.process.is_alive():
                self._reap(child)
        now = time.monotonic()
        self._enforce_time_limits(now)
        if not self._stopping.is_set():
            if self.autoscale is not None:
                self._autoscale(now)
            self._ensure_size(now)

    def _wait_time(self) -> float:
        now = time.monotonic()
        timeout = TURN
        for child in self._children:
            deadline = child.slot.deadline()
            if deadline and child.overran is None:
                timeout = min(timeout, max(0.0, deadline - now))
        if self._respawn_after > now:
            timeout = min(timeout, self._respawn_after - now)
        return timeout

    def _enforce_time_limits(self, now: float) -> None:
        for child in self._children:
            deadline = child.slot.deadline()
            if not deadline or now < deadline or child.overran is not None:
                continue
            try:
                running = child.slot.read().running
            except TornSlot:
                continue  # being written: the job just changed; look again next turn
            if running is None or not running.time_limit:
                continue
            child.overran = running
            logger.error("Task %s[%s] hit its hard time limit (%ss); killing process %s",
                         running.task_name, running.task_id, running.time_limit,
                         child.process.pid)
            child.process.kill()

    def _reap(self, child: Child) -> None:
        child.process.join(timeout=5)
        self._children.remove(child)
        code = child.process.exitcode
        child.process.close()
        try:
            state = child.slot.read(attempts=3)
        except TornSlot:
            logger.warning("Process %s died while recording what it held; its messages "
                           "come back when their leases lapse", child.process.pid)
            state = SlotState()
        self.processed += state.processed
        running = child.overran or state.running
        overran = child.overran
        if overran is not None and overran.time_limit:
            with _as_request(overran):
                self.settler.settle_time_limit(overran.task_id, overran.task_name,
                                               self._late_delivery(overran),
                                               overran.time_limit)
            task = self.app.tasks.get(overran.task_name)
            self._end_early_ack(overran)
            self._judge(overran, task is None or task.acks_on_failure_or_timeout)
        elif running is not None and self._cold.is_set():
            self._end_early_ack(running)
            late = self._late_delivery(running)
            if late is not None:
                self.settler.give_back(late, "worker stopped before the task finished")
        elif running is not None:
            logger.error("Process %s running %s[%s] exited with code %s",
                         child.process.pid, running.task_name, running.task_id, code)
            with _as_request(running):
                self.settler.settle_lost(running.task_id, running.task_name,
                                         self._late_delivery(running), code)
            task = self.app.tasks.get(running.task_name)
            self._end_early_ack(running)
            self._judge(running, not (task is not None and task.reject_on_worker_lost))
        elif not child.asked_to_stop and code != 0 and not self._stopping.is_set():
            logger.warning("Idle process %s exited with code %s; replacing it",
                           child.process.pid, code)
        self._give_back_held(state, running)
        self._release_unread(child, state)
        if state.overflowed:
            logger.warning("Process %s held more messages than it could record; the rest "
                           "come back when their leases lapse", child.process.pid)
        self._pace_respawns(child, code, running)

    def _pace_respawns(self, child: Child, code: int | None, running: RunningJob | None) -> None:
        # A process that cannot even start (an import error, say) must not be restarted
        # in a tight loop; one that lived a while, or died of a task, is replaced at once.
        now = time.monotonic()
        if code != 0 and running is None and now - child.started_at < 1.0:
            logger.warning("Process %s exited at start (code %s); next one in %.0fs",
                           child.process.pid, code, self._delay_respawns(now))
        else:
            self._respawn_delay = 0.0

    def _delay_respawns(self, now: float) -> float:
        """Hold the next process back, twice as long as last time (1 s to 30 s); the
        delay in seconds."""
        self._respawn_delay = min(max(1.0, self._respawn_delay * 2), RESPAWN_MAX_DELAY)
        self._respawn_after = now + self._respawn_delay
        return self._respawn_delay

    def _late_delivery(self, running: RunningJob) -> Delivery | None:
        """The running job's unacknowledged message, if this broker lets us settle it."""
        if (running.delivery is None or not running.acks_late
                or not self.app.broker.settles_any_delivery):
            return None
        return delivery_from_ref(running.delivery)

    def _end_early_ack(self, running: RunningJob) -> None:
        """An early-ack job was acknowledged when it started, but the process may have died
        before its batched ack reached the broker: acknowledge it again (a no-op if it did)."""
        if (running.delivery is not None and not running.acks_late
                and self.app.broker.settles_any_delivery):
            self.settler.acknowledge(delivery_from_ref(running.delivery))

    def _judge(self, running: RunningJob, acknowledge: bool) -> None:
        """Where the broker redelivers the message by itself, say what to do with it (an
        early-ack message is acknowledged: it was, when it started)."""
        if running.delivery is not None and not self.app.broker.settles_any_delivery:
            self._verdicts.give(running.task_id, acknowledge or not running.acks_late)

    def _give_back_held(self, state: SlotState, running: RunningJob | None) -> None:
        """Settle what the process held besides its running job: a message that never
        started goes back to the queue; one that started was acknowledged then (early
        ack) or settled when it ended, so its ack, perhaps lost with the process, is sent
        again (a no-op if it arrived)."""
        if not self.app.broker.settles_any_delivery:
            return
        running_tag = running.delivery[1] if running and running.delivery else None
        for index, ref in enumerate(state.held):
            if ref[1] == running_tag:
                continue
            started = state.settled_by_start(index)
            if started:
                self.settler.acknowledge(delivery_from_ref(ref))
            elif started is False:
                self.settler.give_back(delivery_from_ref(ref), "its process ended")
            # else: beyond what the record tracks; the lease lapses and it comes back
        for ref in state.acking:
            if ref[1] != running_tag:
                self.settler.acknowledge(delivery_from_ref(ref))

    def _release_unread(self, child: Child, state: SlotState) -> None:
        """Give back what the process's fetch sent ahead took, if it died before reading
        the reply (nothing of it can have started)."""
        if not state.unread:
            return
        try:
            released = self.app.broker.release_unread(self.queue_names, state.unread)
        except BrokerError as exc:
            logger.warning("Could not give back what process %s had fetched ahead (%s); it "
                           "comes back when its leases lapse", child.process.pid, exc)
            return
        if released:
            logger.info("Gave back %d messages process %s had fetched ahead", released,
                        child.process.pid)

    def _autoscale(self, now: float) -> None:
        if now - self._last_scale < TURN:
            return
        self._last_scale = now
        assert self.autoscale is not None
        states = []
        for child in self._children:
            if child.asked_to_stop:
                continue
            with contextlib.suppress(TornSlot):
                states.append((child, child.slot.read()))
        backlog = sum(state.backlog for _, state in states)
        idle = [child for child, state in states if state.running is None]
        if backlog or not idle:
            self._idle_since = now
        delta = self.autoscale.decide(size=self.target, backlog=backlog,
                                      idle_slots=len(idle), idle_for=now - self._idle_since)
        if delta > 0:
            logger.info("Autoscale: growing the pool by %d", delta)
            self.target += delta
        elif delta < 0:
            logger.info("Autoscale: shrinking the pool by %d", -delta)
            self.target += delta
            for child in idle[:-delta]:
                self._ask_to_stop(child)
            self._idle_since = now

    # -- shutdown ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stopping.set()
        for child in self._children:
            if not self._cold.is_set():
                self._ask_to_stop(child)
        while self._children and not self._cold.is_set():
            self._turn()  # reaps them as they finish; time limits still hold
        for child in self._children:
            child.asked_to_stop = True
            with contextlib.suppress(OSError):
                child.process.kill()
        while self._children:
            self._turn()
        self.settler.acker.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._fork_server.close()  # its processes are gone: it exits
        for fd in (self._lifeline_r, self._lifeline_w, self._board_fd, self._verdicts_fd):
            os.close(fd)
        if self._gate_directory is not None:
            remove_gate_directory(self._gate_directory)
        logger.info("%s stopped after %d tasks", self.hostname, self.processed)

    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children]
