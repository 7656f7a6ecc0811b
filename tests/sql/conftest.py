"""Fixtures for the SQL backend tests: every test runs on PostgreSQL, MariaDB and SQLite,
in a schema, database or file of its own that is dropped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.sql.databases import DIALECTS, Scratch, scratch_database

from conveyor.backends.sql import SqlBackend

MakeBackend = Callable[..., SqlBackend]


@pytest.fixture(params=DIALECTS)
def scratch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scratch]:
    with scratch_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture
def make_backend(scratch: Scratch) -> Iterator[MakeBackend]:
    made: list[SqlBackend] = []

    def make(**options: Any) -> SqlBackend:
        backend = SqlBackend(scratch.url, **{**scratch.options, **options})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: MakeBackend) -> SqlBackend:
    return make_backend()
