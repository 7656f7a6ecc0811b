"""Databases of their own for SQL backend tests, dropped afterwards.

PostgreSQL: a schema in the test database; MariaDB: a database; SQLite: a file in the
test's temporary directory. Used by the tests here and the contract suite's factories.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool
from tests.conftest import MYSQL_URL, POSTGRES_URL, require_service

DIALECTS = ("postgresql", "mysql", "sqlite")


@dataclass(frozen=True)
class Scratch:
    url: str
    """The backend URL (``db+...``), as both Conveyor and Celery take it."""
    options: dict[str, Any] = field(default_factory=dict)
    """Transport options that point the backend at the scratch tables."""

    def admin_engine(self) -> sa.Engine:
        """An engine on the same database, for looking at the tables directly."""
        from conveyor.backends.sql import sqlalchemy_url

        return sa.create_engine(sqlalchemy_url(self.url), poolclass=NullPool)


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def _require(name: str, url: str, default_port: int) -> None:
    parsed = sa.make_url(url)
    require_service(name, parsed.host or "127.0.0.1", parsed.port or default_port)


@contextmanager
def scratch_database(dialect: str, tmp_path: Path) -> Iterator[Scratch]:
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    if dialect == "sqlite":
        yield Scratch(f"db+sqlite:///{tmp_path / f'{name}.db'}")
        return
    if dialect == "postgresql":
        _require("PostgreSQL", POSTGRES_URL, 5432)
        admin = _admin(POSTGRES_URL)
        create, drop = f'CREATE SCHEMA "{name}"', f'DROP SCHEMA "{name}" CASCADE'
        scratch = Scratch(
            f"db+{POSTGRES_URL}",
            {"database_table_schemas": {"task": name, "group": name}},
        )
    elif dialect == "mysql":
        _require("MariaDB", MYSQL_URL, 3306)
        admin = _admin(MYSQL_URL)
        create, drop = f"CREATE DATABASE `{name}`", f"DROP DATABASE `{name}`"
        scratch = Scratch(
            "db+" + sa.make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
        )
    else:
        raise ValueError(dialect)
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(create))
        yield scratch
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(drop))
        admin.dispose()
