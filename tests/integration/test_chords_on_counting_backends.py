"""Chords counted by the SQL and Memcached backends' atomic counters: no polling task.

The workflow suite's chord tests run here with the result backend on PostgreSQL,
MariaDB and Memcached (the broker in memory), and no ``celery.chord_unlock`` is sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration import test_canvas as canvas_suite
from tests.memcached.service import require_memcached
from tests.sql.databases import scratch_database

from conveyor import Conveyor

CHORD_TESTS = (
    "test_chord_runs_the_body_once_with_ordered_results",
    "test_failing_header_part_fails_the_chord_and_calls_errbacks",
    "test_nested_chain_in_group_in_chord",
    "test_group_inside_a_chain_becomes_a_chord",
)
for _name in CHORD_TESTS:
    globals()[_name] = getattr(canvas_suite, _name)


@pytest.fixture(params=["postgresql", "mysql", "memcached"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Conveyor]:
    if request.param == "memcached":
        url = require_memcached()
        options = {"global_keyprefix": f"chords-{uuid.uuid4().hex[:8]}"}
        yield from _app(url, options)
        return
    with scratch_database(request.param, tmp_path) as scratch:
        yield from _app(scratch.url, scratch.options)


def _app(backend_url: str, options: dict[str, object]) -> Iterator[Conveyor]:
    broker = f"memory://chords-{uuid.uuid4().hex[:8]}"
    instance = Conveyor("w", broker=broker, backend=backend_url,
                        result_backend_transport_options=options)
    assert instance.backend is not None
    assert instance.backend.supports_counters
    canvas_suite.register(instance)
    canvas_suite.ERRBACK_CALLS.clear()

    unlocks: list[str] = []
    original = instance.send_task

    def watching_send(name: str, *args: object, **kwargs: object) -> object:
        unlocks.extend([name] if name == "celery.chord_unlock" else [])
        return original(name, *args, **kwargs)  # type: ignore[arg-type]

    instance.send_task = watching_send  # type: ignore[method-assign]
    yield instance
    assert unlocks == [], "a counting backend must not fall back to polling"
    instance.close()

