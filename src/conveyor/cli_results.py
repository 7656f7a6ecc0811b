"""``conveyor results``: housekeeping of the result backend.

``conveyor -A proj results cleanup`` deletes expired results now, as Celery's
``celery.backend_cleanup`` task does for backends that do not expire results by
themselves (SQL, SQLite). Run it from cron or a periodic task; on backends that expire
by themselves (memcached, Redis) it has nothing to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from conveyor.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from conveyor.cli import State


@click.group("results")
def results() -> None:
    """Manage stored task results."""


@results.command()
@click.pass_obj
def cleanup(state: State) -> None:
    """Delete expired results from the result backend and say how many."""
    # Imported here: conveyor.cli imports this module to attach the group.
    from conveyor.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_UNREACHABLE, fail, out

    backend = state.app.backend
    if backend is None:
        fail("the app has no result backend configured", EXIT_CONFIG)
    try:
        deleted = backend.cleanup()
    except BackendUnavailable as exc:
        fail(f"cannot reach the result backend: {exc}", EXIT_UNREACHABLE)
    except BackendError as exc:
        fail(f"cleanup failed: {exc}", EXIT_FAILED)
    noun = "result" if deleted == 1 else "results"
    out.print(f"Deleted {deleted} expired {noun}.", highlight=False)
