"""What a finished task sets in motion (PROTOCOL.md 1.6, 7.8).

After SUCCESS: callbacks get the result prepended, the next chain step is sent with the
rest of the chain, and a chord header part is counted. After FAILURE: every remaining
frozen chain step is marked failed (so waiting on the chain's last result never hangs),
a chord part is counted (a failed part fails the chord), and errbacks run: in-process
as ``errback(request, exc, traceback)`` when registered here with more than one
parameter, otherwise sent with the failed task's id as their one argument.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

from conveyor import states
from conveyor.backends.meta import build_meta
from conveyor.builtins import fail_signature, finish_chord
from conveyor.canvas import Signature, chord, signature
from conveyor.errors import ChordError
from conveyor.execution import Outcome

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.request import Request

logger = logging.getLogger("conveyor.worker")


def after_task(app: Conveyor, request: Request, outcome: Outcome) -> None:
    """Never raises: a workflow step that can't be sent is logged with the reason."""
    try:
        if outcome.state == states.SUCCESS:
            _after_success(app, request, outcome.value)
        elif outcome.state == states.FAILURE:
            _after_failure(app, request, outcome)
    except Exception:
        logger.exception("Task %s[%s]: the workflow step after it could not be sent",
                         request.task, request.id)


def _lineage(request: Request) -> dict[str, Any]:
    return {"parent_id": request.id, "root_id": request.root_id or request.id}


def _after_success(app: Conveyor, request: Request, value: Any) -> None:
    embed = request.embed
    for callback in embed.callbacks or ():
        signature(callback, app).apply_async((value,), **_lineage(request))
    if embed.chain:
        remaining = list(embed.chain)
        following = signature(remaining.pop(), app)
        following.apply_async((value,), chain=remaining or None, **_lineage(request))
    if embed.chord is not None and request.group:
        count_chord_part(app, request)


def _after_failure(app: Conveyor, request: Request, outcome: Outcome) -> None:
    embed = request.embed
    exc = outcome.value if isinstance(outcome.value, BaseException) else None
    for step in embed.chain or ():
        _mark_failed(app, signature(step, app), exc)
    if embed.chord is not None and request.group:
        count_chord_part(app, request)
    for errback in embed.errbacks or ():
        _call_errback(app, request, signature(errback, app), exc, outcome.traceback)


def _mark_failed(app: Conveyor, step: Signature, exc: BaseException | None) -> None:
    backend = app.backend
    if backend is None or exc is None:
        return
    target = step.body if isinstance(step, chord) else step
    if target.id is not None:
        backend.store(target.id, build_meta(target.id, states.FAILURE, exc))


def _takes_request(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) > 1 or any(p.kind is inspect.Parameter.VAR_POSITIONAL
                                      for p in parameters)


def _call_errback(app: Conveyor, request: Request, errback: Signature,
                  exc: BaseException | None, traceback: str | None) -> None:
    task = app.tasks.get(errback.task)
    if task is not None and not task.bind and _takes_request(task.fun):
        task.fun(request, exc, traceback, *errback.args, **errback.kwargs)
        return
    errback.apply_async((request.id,), **_lineage(request))


def count_chord_part(app: Conveyor, request: Request) -> None:
    backend = app.backend
    body = request.embed.chord
    if backend is None or body is None or request.group is None or request.id is None:
        return
    if not backend.supports_counters:
        return  # celery.chord_unlock, sent with the chord, finishes it
    metas = backend.on_chord_part(request.group, request.id, request.group_index)
    if metas is None:
        return
    try:
        finish_chord(app, body, metas, request)
    except Exception as exc:
        # This part won the claim: nobody else will send the body, so fail it visibly
        # rather than leave whoever waits on it waiting forever.
        logger.exception("Chord %s: its body could not be sent", request.group)
        fail_signature(app, signature(body, app), ChordError(f"Callback error: {exc!r}"))
