"""Running one job where the pool runs it: decode the body, run the task, store the result."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor import protocol, serialization, states
from conveyor.backends.meta import build_meta
from conveyor.errors import BackendError, MessageError, SerializationError
from conveyor.execution import LoopRunner, Outcome, aexecute, execute, mark_started, record
from conveyor.request import Request
from conveyor.worker.job import Job, JobResult
from conveyor.worker.workflow import after_task

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.task import BaseTask

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


@dataclass(slots=True)
class Prepared:
    task: BaseTask[Any, Any]
    request: Request
    args: list[Any]
    kwargs: dict[str, Any]


def prepare(app: Conveyor, job: Job) -> Prepared | JobResult:
    """Decode the body and build the request; a JobResult if the job cannot run."""
    task = app.tasks.get(job.task_name)
    if task is None:  # the consumer checks this first; a registry change is the only way
        return JobResult(job.seq, states.FAILURE, invalid=True,
                         reason=f"task {job.task_name!r} is not registered")
    try:
        args, kwargs, embed = job.body or protocol.decode_body(
            job.envelope, serialization.normalize_accept(app.conf.accept_content),
            job.headers.protocol)
    except (MessageError, SerializationError) as exc:
        reason = f"invalid message body for {job.task_name}[{job.task_id}]: {exc}"
        logger.error("Rejected: %s", reason)
        backend = app.backend
        if backend is not None:
            backend.store(job.task_id, build_meta(
                job.task_id, states.FAILURE, exc, request={"task": job.task_name}))
        return JobResult(job.seq, states.FAILURE, invalid=True, reason=reason)
    request = _request(job, args, kwargs, embed)
    mark_started(task, request)
    return Prepared(task, request, args, kwargs)


def finish(app: Conveyor, job: Job, prepared: Prepared, outcome: Outcome) -> JobResult:
    """Store the outcome, set the workflow in motion, log; the result for the worker."""
    try:
        outcome = record(prepared.task, prepared.request, outcome)
    except BackendError as exc:
        # The retries are spent. A late-ack message goes back to run again later, so the
        # result is not lost; an early-ack one was already acknowledged.
        logger.error("Task %s[%s] ended %s but its state could not be stored: %s",
                     job.task_name, job.task_id, outcome.state, exc)
        return JobResult(job.seq, outcome.state, runtime=outcome.runtime,
                         extra={"unstored": str(exc)})
    after_task(app, prepared.request, outcome)
    if outcome.state == states.SUCCESS:
        logger.info("Task %s[%s] succeeded in %.4fs", job.task_name, job.task_id,
                    outcome.runtime)
    elif outcome.state == states.RETRY:
        logger.info("Task %s[%s] retry: %s", job.task_name, job.task_id, outcome.value)
    elif outcome.state == states.FAILURE:
        logger.error("Task %s[%s] raised %r\n%s", job.task_name, job.task_id, outcome.value,
                     outcome.traceback or "")
    return JobResult(job.seq, outcome.state, requeue=outcome.requeue, runtime=outcome.runtime)


def run_job(app: Conveyor, job: Job, loops: LoopRunner) -> JobResult:
    """Never raises for anything the task or its message does wrong."""
    prepared = prepare(app, job)
    if isinstance(prepared, JobResult):
        return prepared
    outcome = execute(prepared.task, prepared.request, prepared.args, prepared.kwargs, loops)
    return finish(app, job, prepared, outcome)


async def arun_job(app: Conveyor, job: Job, loops: LoopRunner) -> JobResult:
    """:func:`run_job` on a running event loop: ``async def`` tasks are awaited here;
    sync tasks and the backend's blocking calls go to worker threads."""
    prepared = await asyncio.to_thread(prepare, app, job)
    if isinstance(prepared, JobResult):
        return prepared
    p = prepared
    if p.task.is_async:
        outcome = await aexecute(p.task, p.request, p.args, p.kwargs)
    else:
        outcome = await asyncio.to_thread(execute, p.task, p.request, p.args, p.kwargs, loops)
    return await asyncio.to_thread(finish, app, job, prepared, outcome)
