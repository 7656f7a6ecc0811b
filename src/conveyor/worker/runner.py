"""Running one job where the pool runs it: decode the body, run the task, store the result."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from conveyor import protocol, serialization, states
from conveyor.backends.meta import build_meta
from conveyor.errors import MessageError, SerializationError
from conveyor.execution import LoopRunner, execute, mark_started, record
from conveyor.request import Request
from conveyor.worker.job import Job, JobResult
from conveyor.worker.workflow import after_task

if TYPE_CHECKING:
    from conveyor.app import Conveyor

logger = logging.getLogger("conveyor.worker")


def _request(job: Job, args: list[object], kwargs: dict[str, object],
             embed: protocol.Embed) -> Request:
    h = job.headers
    props = job.envelope.properties
    return Request(
        id=h.id, task=h.task, args=list(args), kwargs=dict(kwargs), retries=h.retries,
        eta=h.eta, expires=h.expires, group=h.group, group_index=h.group_index,
        root_id=h.root_id, parent_id=h.parent_id, origin=h.origin, shadow=h.shadow,
        hostname=job.hostname, reply_to=str(props.get("reply_to") or ""),
        correlation_id=props.get("correlation_id"), delivery_info=job.delivery_info,
        headers=dict(h.extra), timelimit=(job.time_limit, job.soft_time_limit),
        ignore_result=h.ignore_result, acks_late=job.acks_late, embed=embed,
        is_eager=False, called_directly=False, stamps=h.stamps,
    )


def run_job(app: Conveyor, job: Job, loops: LoopRunner) -> JobResult:
    """Never raises for anything the task or its message does wrong."""
    task = app.tasks.get(job.task_name)
    if task is None:  # the consumer checks this first; a registry change is the only way
        return JobResult(job.seq, states.FAILURE, invalid=True,
                         reason=f"task {job.task_name!r} is not registered")
    accept = serialization.normalize_accept(app.conf.accept_content)
    try:
        args, kwargs, embed = protocol.decode_body(job.envelope, accept, job.headers.protocol)
    except (MessageError, SerializationError) as exc:
        reason = f"invalid message body for {job.task_name}[{job.task_id}]: {exc}"
        logger.error("Rejected: %s", reason)
        backend = app.backend
        if backend is not None:
            backend.store(job.task_id, build_meta(
                job.task_id, states.FAILURE, exc, request={"task": job.task_name}))
        return JobResult(job.seq, states.FAILURE, invalid=True, reason=reason)
    request = _request(job, args, kwargs, embed)
    mark_started(task, request, os.getpid())
    started = time.perf_counter()
    outcome = record(task, request, execute(task, request, args, kwargs, loops))
    after_task(app, request, outcome)
    runtime = time.perf_counter() - started
    if outcome.state == states.SUCCESS:
        logger.info("Task %s[%s] succeeded in %.4fs", job.task_name, job.task_id, runtime)
    elif outcome.state == states.RETRY:
        logger.info("Task %s[%s] retry: %s", job.task_name, job.task_id, outcome.value)
    elif outcome.state == states.FAILURE:
        logger.error("Task %s[%s] raised %r\n%s", job.task_name, job.task_id, outcome.value,
                     outcome.traceback or "")
    return JobResult(job.seq, outcome.state, requeue=outcome.requeue, runtime=runtime)
