"""What the worker decides about each message, and what it does when a job ends.

No threads here: ``Worker`` drives these steps from its fetch, dispatch and pool
threads. Every message fetched ends in exactly one of: ack, reject (requeue or
dead-letter, with the reason logged), or defer (an eta that arrived early).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor import protocol, serialization, states
from conveyor.backends.meta import build_meta
from conveyor.errors import (
    BrokerError,
    ContentDisallowed,
    MessageError,
    NotRegistered,
    SerializationError,
    TaskRevokedError,
    TimeLimitExceeded,
    WorkerLostError,
)
from conveyor.worker.acker import Acker
from conveyor.worker.job import Job, JobResult

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.envelope import Delivery

logger = logging.getLogger("conveyor.worker")


class Consumer:
    def __init__(self, app: Conveyor, hostname: str) -> None:
        self.app = app
        self.acker = Acker(app.broker)
        self.hostname = hostname
        self.accept = serialization.normalize_accept(app.conf.accept_content)
        self.lock = threading.Condition()
        self.ready: deque[Job] = deque()
        self.held: dict[int, Delivery] = {}
        self.running: dict[int, Job] = {}
        self._seq = itertools.count(1)
        self.processed = 0
        self.verdict: Callable[[str], tuple[bool, int] | None] | None = None
        """Where a supervisor's word on redelivered messages is read (see Verdicts)."""

    @property
    def inflight(self) -> int:
        """Messages taken from the broker and not finished: waiting or running."""
        return len(self.ready) + len(self.running)

    @property
    def unacked(self) -> int:
        """Messages taken from the broker and not acknowledged yet."""
        return len(self.held)

    # -- broker calls that must not kill the worker -------------------------------------
    def _settle(self, delivery: Delivery, action: str, reason: str = "") -> None:
        if action == "ack":
            self.acker.ack([delivery])
            return
        broker = self.app.broker
        try:
            if action == "requeue":
                broker.reject(delivery, requeue=True, reason=reason)
            else:
                broker.reject(delivery, requeue=False, reason=reason)
        except BrokerError as exc:
            # The lease will lapse and the message comes back: at-least-once holds.
            logger.warning("Could not %s message %s: %s", action, delivery.tag, exc)

    def _store(self, task_id: str, state: str, value: Any, task_name: str | None) -> None:
        backend = self.app.backend
        if backend is None:
            return
        try:
            backend.store(task_id, build_meta(task_id, state, value,
                                              request={"task": task_name}))
        except Exception as exc:
            logger.warning("Could not store %s for %s: %s", state, task_id, exc)

    def _refuse(self, delivery: Delivery, reason: str, *, task_id: str | None = None,
                task_name: str | None = None, exc: BaseException | None = None) -> None:
        logger.error("Rejected message from queue %r: %s", delivery.queue, reason)
        if task_id is not None and exc is not None:
            self._store(task_id, states.FAILURE, exc, task_name)
        self._settle(delivery, "dead-letter", reason)

    # -- intake ---------------------------------------------------------------------------
    def intake(self, delivery: Delivery) -> Job | None:
        """Check a fetched message; return the job to run, or None if it was settled."""
        envelope = delivery.envelope
        try:
            headers = protocol.read_headers(envelope, self.accept)
        except (MessageError, SerializationError) as exc:
            self._refuse(delivery, f"not a task message: {exc}")
            return None
        name, task_id = headers.task, headers.id
        if headers.protocol == 2 and envelope.content_type not in self.accept:
            refused = ContentDisallowed(
                f"content type {envelope.content_type!r} is not accepted "
                f"(accept_content={sorted(self.accept)})")
            self._refuse(delivery, f"{name}[{task_id}]: {refused}", task_id=task_id,
                         task_name=name, exc=refused)
            return None
        task = self.app.tasks.get(name)
        if task is None:
            self._refuse(delivery, f"unknown task {name!r} (id {task_id}); "
                         "is it registered with this worker's app?", task_id=task_id,
                         task_name=name, exc=NotRegistered(name))
            return None
        if delivery.redelivered and self.verdict is not None:
            verdict = self.verdict(task_id)
            if verdict is not None:
                acknowledge, lost = verdict
                if acknowledge:
                    logger.warning("Task %s[%s] was failed when its process died; its "
                                   "message came back and is acknowledged, not run",
                                   name, task_id)
                    self._settle(delivery, "ack")
                    return None
                delivery.delivery_count = max(delivery.delivery_count, lost + 1)
        limit = self.app.conf.worker_max_deliveries
        if limit is not None and delivery.delivery_count > limit:
            looping = WorkerLostError(
                f"delivered {delivery.delivery_count} times without finishing")
            self._refuse(delivery, f"{name}[{task_id}] {looping}", task_id=task_id,
                         task_name=name, exc=looping)
            return None
        body = None
        if headers.protocol == 2:
            try:
                body = protocol.decode_body(envelope, self.accept, headers.protocol)
            except (MessageError, SerializationError) as exc:
                self._refuse(delivery, f"{name}[{task_id}] has an invalid body: {exc}",
                             task_id=task_id, task_name=name, exc=exc)
                return None
        now = datetime.now(UTC)
        if headers.expires is not None and headers.expires <= now:
            self._expire(delivery, headers)
            return None
        if headers.eta is not None and headers.eta > now:
            # It waits in the broker, not here: no slot, no memory, no lease to keep alive.
            try:
                self.app.broker.defer(delivery, headers.eta.timestamp())
            except BrokerError as exc:
                logger.warning("Could not defer %s[%s]: %s", name, task_id, exc)
            return None
        acks_late = headers.extra.get("acks_late")
        job = Job(
            seq=next(self._seq),
            envelope=envelope,
            headers=headers,
            delivery_info={**delivery.delivery_info, "queue": delivery.queue},
            hostname=self.hostname,
            acks_late=task.acks_late if not isinstance(acks_late, bool) else acks_late,
            time_limit=headers.time_limit if headers.time_limit is not None
            else task.time_limit,
            soft_time_limit=headers.soft_time_limit if headers.soft_time_limit is not None
            else task.soft_time_limit,
            body=body,
        )
        logger.info("Task %s[%s] received", name, task_id)
        if task.track_received and not (headers.ignore_result if headers.ignore_result
                                         is not None else task.ignore_result):
            self._store(task_id, states.RECEIVED, None, name)
        with self.lock:
            self.held[job.seq] = delivery
            self.ready.append(job)
            self.lock.notify_all()
        return job

    def _expire(self, delivery: Delivery, headers: protocol.TaskHeaders) -> None:
        logger.info("Task %s[%s] expired at %s; not run", headers.task, headers.id,
                    headers.expires)
        self._store(headers.id, states.REVOKED, TaskRevokedError("expired"), headers.task)
        if headers.group is not None:
            self._count_expired_chord_part(delivery, headers)
        self._settle(delivery, "ack")

    def _count_expired_chord_part(self, delivery: Delivery,
                                  headers: protocol.TaskHeaders) -> None:
        # A chord counts every part that ends, run or not, or its body would wait forever.
        from conveyor.request import Request
        from conveyor.worker.workflow import count_chord_part

        try:
            _, _, embed = protocol.decode_body(delivery.envelope, self.accept,
                                               headers.protocol)
            if embed.chord is not None:
                count_chord_part(self.app, Request(
                    id=headers.id, task=headers.task, group=headers.group,
                    group_index=headers.group_index, root_id=headers.root_id, embed=embed,
                    called_directly=False))
        except Exception:
            logger.exception("Could not count expired chord part %s", headers.id)

    # -- dispatch -------------------------------------------------------------------------
    def take_ready(self) -> Job | None:
        """Next job to start (caller holds ``lock``); expired ones are settled here."""
        while self.ready:
            job = self.ready.popleft()
            expires = job.headers.expires
            if expires is not None and expires <= datetime.now(UTC):
                delivery = self.held.pop(job.seq)
                self._expire(delivery, job.headers)
                continue
            self.running[job.seq] = job
            if not self.ready:
                self.lock.notify_all()  # the fetcher refills at once when nothing waits
            return job
        return None

    def started(self, jobs: Sequence[Job]) -> None:
        """The pool accepted these jobs: early-ack ones are acknowledged now, together."""
        with self.lock:
            deliveries = [self.held.pop(job.seq) for job in jobs
                          if not job.acks_late and job.seq in self.held]
        if deliveries:
            self.acker.ack(deliveries)

    def not_started(self, job: Job) -> None:
        with self.lock:
            self.running.pop(job.seq, None)
            self.ready.appendleft(job)
            self.lock.notify_all()

    # -- completion ------------------------------------------------------------------------
    def finished(self, job: Job, result: JobResult) -> None:
        if result.extra.get("not_started"):
            self.not_started(job)  # its process ended first: it runs on another slot
            return
        with self.lock:
            self.running.pop(job.seq, None)
            delivery = self.held.pop(job.seq, None)
            self.processed += 1
            self.lock.notify_all()
        task = self.app.tasks.get(job.task_name)
        if result.extra.get("lost"):
            self.settle_lost(job.task_id, job.task_name, delivery, result.extra.get("exitcode"))
            return
        if "time_limit" in result.extra:
            self.settle_time_limit(job.task_id, job.task_name, delivery,
                                   result.extra["time_limit"])
            return
        if result.invalid:
            self._end(delivery, "dead-letter", result.reason)
            return
        if "unstored" in result.extra:
            self._end(delivery, "requeue", "its result could not be stored")
            return
        if result.state == states.REJECTED:
            self._end(delivery, "requeue" if result.requeue else "dead-letter",
                      "task raised Reject")
            return
        if result.state == states.FAILURE and task is not None and not (
                task.acks_on_failure_or_timeout):
            self._end(delivery, "dead-letter", "task failed")
            return
        self._end(delivery, "ack", "")

    def settle_lost(self, task_id: str, task_name: str, delivery: Delivery | None,
                    exitcode: object) -> None:
        """The process running the task died: fail it, then settle its message (None when
        it was acknowledged early) as the task's ``reject_on_worker_lost`` says."""
        task = self.app.tasks.get(task_name)
        self._store(task_id, states.FAILURE, WorkerLostError(
            f"Worker exited prematurely: exitcode {exitcode}."), task_name)
        requeue = task is not None and task.reject_on_worker_lost
        self._end(delivery, "requeue" if requeue else "ack", "worker lost")

    def settle_time_limit(self, task_id: str, task_name: str, delivery: Delivery | None,
                          limit: float) -> None:
        """The task was killed at its hard time limit."""
        task = self.app.tasks.get(task_name)
        self._store(task_id, states.FAILURE, TimeLimitExceeded(limit), task_name)
        ack = task is None or task.acks_on_failure_or_timeout
        self._end(delivery, "ack" if ack else "requeue", "hard time limit")

    def _end(self, delivery: Delivery | None, action: str, reason: str) -> None:
        if delivery is not None:  # None: an early-ack job, acknowledged when it started
            self._settle(delivery, action, reason)

    # -- leases and shutdown -----------------------------------------------------------------
    def leased(self) -> list[Delivery]:
        with self.lock:
            return list(self.held.values())

    def acknowledge(self, delivery: Delivery) -> None:
        self._settle(delivery, "ack")

    def give_back(self, delivery: Delivery, reason: str) -> None:
        """Requeue a message this worker will not run; a broker error only logs (the
        lease lapses and the message comes back all the same)."""
        self._settle(delivery, "requeue", reason)

    def release_unstarted(self) -> int:
        """Give prefetched, not started messages back to the broker at once."""
        with self.lock:
            jobs = list(self.ready)
            self.ready.clear()
            deliveries = [self.held.pop(job.seq) for job in jobs if job.seq in self.held]
        for delivery in deliveries:
            self._settle(delivery, "requeue", "worker shutting down")
        return len(deliveries)

    def release_jobs(self, jobs: Sequence[Job]) -> None:
        """Requeue unfinished late-ack jobs (cold shutdown); early-ack ones are gone."""
        for job in jobs:
            with self.lock:
                delivery = self.held.pop(job.seq, None)
                self.running.pop(job.seq, None)
            if delivery is not None:
                self._settle(delivery, "requeue", "worker stopped before the task finished")
