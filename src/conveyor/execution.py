"""Running one task: call it, classify how it ended, store what the caller should see.

The same code serves every pool and eager mode, so retries, failures and results
behave alike wherever a task runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback as tb
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor import states
from conveyor.backends.meta import build_meta
from conveyor.errors import BackendUnavailable, EncodeError, Ignore, Reject, Retry
from conveyor.outages import call_with_retry
from conveyor.request import request_context
from conveyor.retry_policy import backoff_countdown

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.request import Request
    from conveyor.task import BaseTask

logger = logging.getLogger("conveyor.task")

IGNORED = "IGNORED"
"""Not a stored state: the task raised Ignore, so nothing is stored."""


@dataclass(slots=True)
class Outcome:
    state: str
    value: Any = None
    traceback: str | None = None
    requeue: bool = False
    runtime: float = 0.0


class LoopRunner:
    """One event loop per thread, kept for the life of the thread (not one per call)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
            self._local.loop = loop
        return loop.run_until_complete(coroutine)

    def close(self) -> None:
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def format_traceback(exc: BaseException) -> str:
    text = "".join(tb.format_exception(exc))
    # Frames keep every local of the failed call alive; the text is all we keep.
    exc.__traceback__ = None
    return text


def _autoretry(task: BaseTask[Any, Any], request: Request, exc: Exception) -> Outcome | None:
    if not task.autoretry_for or not isinstance(exc, task.autoretry_for):
        return None
    if task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for):
        return None
    options = dict(task.retry_kwargs)
    if task.retry_backoff and "countdown" not in options:
        factor = 1.0 if task.retry_backoff is True else float(task.retry_backoff)
        options["countdown"] = backoff_countdown(
            factor, request.retries, task.retry_backoff_max, jitter=task.retry_jitter)
    try:
        with request_context(request):
            task.retry(exc=exc, **options)
    except Retry as retry:
        return Outcome(states.RETRY, retry, format_traceback(exc))
    except Exception as final:
        return Outcome(states.FAILURE, final, format_traceback(final))


def execute(
    task: BaseTask[Any, Any],
    request: Request,
    args: list[Any],
    kwargs: dict[str, Any],
    loops: LoopRunner,
) -> Outcome:
    """Run the task and say how it ended; never raises for the task's own errors."""
    started = time.perf_counter()
    try:
        value = task.run_with(request, args, kwargs)
        if task.is_async:
            value = loops.run(value)
        outcome = Outcome(states.SUCCESS, value)
    except Exception as exc:  # a task's failure is data, not a crash
        outcome = classify_error(task, request, exc)
    outcome.runtime = time.perf_counter() - started
    return outcome


async def aexecute(
    task: BaseTask[Any, Any],
    request: Request,
    args: list[Any],
    kwargs: dict[str, Any],
) -> Outcome:
    """:func:`execute` for an ``async def`` task, awaited on the caller's running loop."""
    started = time.perf_counter()
    try:
        outcome = Outcome(states.SUCCESS, await task.run_with(request, args, kwargs))
    except Exception as exc:  # a task's failure is data, not a crash
        outcome = classify_error(task, request, exc)
    outcome.runtime = time.perf_counter() - started
    return outcome


def classify_error(task: BaseTask[Any, Any], request: Request, exc: Exception) -> Outcome:
    """How a task that raised ended: retried, ignored, rejected or failed."""
    if isinstance(exc, Retry):
        cause = exc.exc if exc.exc is not None else exc
        return Outcome(states.RETRY, exc, format_traceback(cause))
    if isinstance(exc, Ignore):
        return Outcome(IGNORED)
    if isinstance(exc, Reject):
        return Outcome(states.REJECTED, exc, requeue=exc.requeue)
    return _autoretry(task, request, exc) or Outcome(
        states.FAILURE, exc, format_traceback(exc))


def store_meta(app: Conveyor, task_id: str, meta: Mapping[str, Any]) -> None:
    """Store a result document, riding out a short backend outage (retry with backoff,
    logged); raises the backend's error once the retries are spent."""
    backend = app.backend
    if backend is None:
        return
    conf = app.conf
    if not conf.result_backend_always_retry:
        backend.store(task_id, meta)
        return
    call_with_retry(
        lambda: backend.store(task_id, meta), retry_on=(BackendUnavailable,),
        max_retries=conf.result_backend_max_retries,
        first_delay=conf.result_backend_base_sleep_between_retries_ms / 1000,
        max_delay=conf.result_backend_max_sleep_between_retries_ms / 1000,
        what=f"Storing the state of {task_id}", logger=logger)


def stored_value(outcome: Outcome) -> Any:
    if outcome.state == states.RETRY and isinstance(outcome.value, Retry):
        return outcome.value.exc if outcome.value.exc is not None else outcome.value
    return outcome.value


def should_store(task: BaseTask[Any, Any], request: Request, state: str) -> bool:
    ignore = request.ignore_result if request.ignore_result is not None else task.ignore_result
    if not ignore:
        return True
    return state in states.EXCEPTION_STATES and task.store_errors_even_if_ignored


def record(task: BaseTask[Any, Any], request: Request, outcome: Outcome) -> Outcome:
    """Store the outcome in the result backend; a result that can't be encoded is
    stored as a FAILURE naming why, so the caller learns instead of waiting forever."""
    backend = task.app.backend
    state = states.FAILURE if outcome.state == states.REJECTED else outcome.state
    if backend is None or state == IGNORED or request.id is None:
        return outcome
    if not should_store(task, request, state):
        return outcome
    if isinstance(outcome.value, Retry) and outcome.value.state_stored:
        return outcome
    meta = build_meta(request.id, state, stored_value(outcome), traceback=outcome.traceback,
                      request=request.as_meta_source(), extended=task.app.conf.result_extended)
    try:
        _store(task, request, meta)
    except EncodeError as exc:
        logger.error("Task %s[%s] result could not be stored: %s", task.name, request.id, exc)
        failure = Outcome(states.FAILURE, EncodeError(
            f"result of {task.name} could not be serialized: {exc}"), None, runtime=outcome.runtime)
        _store(task, request, build_meta(
            request.id, states.FAILURE, failure.value, request=request.as_meta_source()))
        return failure
    return outcome


def _store(task: BaseTask[Any, Any], request: Request, meta: dict[str, Any]) -> None:
    # In the request's context: a backend that answers the caller directly (rpc://)
    # reads the message's reply_to and correlation_id there.
    assert request.id is not None
    with request_context(request):
        store_meta(task.app, request.id, meta)


def store_retry(task: BaseTask[Any, Any], request: Request, signal: Retry) -> bool:
    """Store RETRY for a retry about to be sent; True if it was stored."""
    backend = task.app.backend
    if backend is None or request.id is None or not should_store(task, request, states.RETRY):
        return False
    cause = signal.exc if signal.exc is not None else signal
    traceback = "".join(tb.format_exception(cause)) if cause.__traceback__ else None
    _store(task, request, build_meta(
        request.id, states.RETRY, cause, traceback=traceback,
        request=request.as_meta_source(), extended=task.app.conf.result_extended))
    return True


def mark_started(task: BaseTask[Any, Any], request: Request) -> None:
    backend = task.app.backend
    if backend is None or request.id is None or not task.track_started:
        return
    if not should_store(task, request, states.STARTED):
        return
    _store(task, request, build_meta(
        request.id, states.STARTED, {"pid": os.getpid(), "hostname": request.hostname},
        request=request.as_meta_source()))
