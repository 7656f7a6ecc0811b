"""Tasks every app has, under Celery's names, so Celery producers' workflows run here.

* ``celery.chord_unlock``: what a Celery producer sends for a chord when its result
  backend cannot count (and what ours sends in that case): it checks the header results
  and retries itself until they are all ready, then sends the body.
* ``celery.map`` / ``celery.starmap``: one task that calls another task's function on
  each item (``add.map(...)``, ``add.starmap(...)``, ``add.chunks(...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from conveyor import states
from conveyor.backends.meta import build_meta, decode_exception
from conveyor.errors import ChordError
from conveyor.request import Request

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.backends.base import Meta
    from conveyor.task import BaseTask


def _member_ids(result: Sequence[Any]) -> list[str]:
    ids: list[str] = []
    for item in result:
        head = item[0] if isinstance(item, (list, tuple)) else item
        ids.append(str(head[0] if isinstance(head, (list, tuple)) else head))
    return ids


def finish_chord(app: Conveyor, body: dict[str, Any], metas: Sequence[Meta],
                 parent: Request | None = None) -> None:
    """Send the body with the header's results, or fail it with a ChordError."""
    from conveyor.canvas import signature

    callback = signature(body, app)
    for meta in metas:
        if meta.get("status") in (states.FAILURE, states.REVOKED):
            cause = decode_exception(meta.get("result"))
            error = ChordError(f"Dependency {meta.get('task_id')} raised {cause!r}")
            fail_signature(app, callback, error)
            return
    values = [meta.get("result") for meta in metas]
    options: dict[str, Any] = {}
    if parent is not None and parent.id is not None:
        options = {"parent_id": parent.id, "root_id": parent.root_id or parent.id}
    callback.apply_async((values,), **options)


def fail_signature(app: Conveyor, callback: Any, error: BaseException) -> None:
    """Store FAILURE for a signature that will never run, and call its errbacks."""
    from conveyor.canvas import signature

    backend = app.backend
    task_id = callback.id
    if backend is not None and task_id is not None:
        backend.store(task_id, build_meta(task_id, states.FAILURE, error))
    for errback in callback.options.get("link_error") or ():
        signature(errback, app).apply_async((task_id,))


def register_builtins(app: Conveyor) -> None:
    from conveyor.canvas import signature

    @app.task(name="celery.chord_unlock", bind=True, max_retries=None,
              default_retry_delay=1.0, ignore_result=True)
    def chord_unlock(self: BaseTask[Any, Any], group_id: str, callback: dict[str, Any],
                     interval: float = 1.0, max_retries: int | None = None,
                     result: Sequence[Any] = (), **_: Any) -> None:
        backend = app.backend
        assert backend is not None, "chord_unlock needs a result backend"
        ids = _member_ids(result) if result else (backend.get_group(group_id) or [])
        found = backend.get_many(ids)
        if any(found.get(i, {}).get("status") not in states.READY_STATES for i in ids):
            self.retry(countdown=interval, max_retries=max_retries)
        finish_chord(app, callback, [found[i] for i in ids], self.request)

    @app.task(name="celery.map")
    def celery_map(task: dict[str, Any], it: Sequence[Any]) -> list[Any]:
        sig = signature(task, app)
        return [sig(item) for item in it]

    @app.task(name="celery.starmap")
    def celery_starmap(task: dict[str, Any], it: Sequence[Sequence[Any]]) -> list[Any]:
        sig = signature(task, app)
        return [sig(*item) for item in it]

