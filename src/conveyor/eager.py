"""Running a task in the calling process (``task.apply()``, ``task_always_eager``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from conveyor import states
from conveyor.backends.meta import build_meta
from conveyor.execution import LoopRunner, execute, format_traceback, stored_value
from conveyor.protocol import new_id
from conveyor.request import Request
from conveyor.result import EagerResult

if TYPE_CHECKING:
    from conveyor.task import BaseTask

R = TypeVar("R")

_loops = LoopRunner()


def run_eagerly(
    task: BaseTask[Any, R], args: list[Any], kwargs: dict[str, Any], *, task_id: str | None
) -> EagerResult[R]:
    """Run now, retrying in place as a worker would retry later."""
    task_id = task_id or new_id()
    retries = 0
    while True:
        request = Request(id=task_id, task=task.name, args=args, kwargs=kwargs,
                          retries=retries, root_id=task_id, is_eager=True,
                          called_directly=False)
        outcome = execute(task, request, args, kwargs, _loops)
        if outcome.state != states.RETRY:
            break
        retries += 1
    state = states.FAILURE if outcome.state == states.REJECTED else outcome.state
    if state not in states.ALL_STATES:
        state = states.SUCCESS
    value = stored_value(outcome)
    if state == states.FAILURE and task.app.conf.task_eager_propagates:
        assert isinstance(value, BaseException)
        raise value
    if isinstance(value, BaseException) and outcome.traceback is None:
        outcome.traceback = format_traceback(value)
    meta = build_meta(task_id, state, value, traceback=outcome.traceback)
    meta["result"] = value  # eager results keep the live object, not its encoding
    return EagerResult(task_id, task.app, meta)
