"""The tables of the SQL result backend, compatible with Celery's database backend.

``celery_taskmeta`` and ``celery_tasksetmeta`` have Celery's columns, types, sequences and
encodings (PROTOCOL.md 4.5), so Celery's ``DatabaseBackend`` and Conveyor read and write
the same rows. Conveyor adds to the task table three nullable columns Celery never maps
(its ORM selects and writes only its own columns, so it ignores them):

* ``group_id`` and ``parent_id``: part of Conveyor's result document, which Celery's
  database backend drops;
* ``expires_at``: when a row written by Conveyor expires (``result_expires`` of the
  writer). Rows written by Celery leave it NULL.

Counters for chords live in a table of their own, ``conveyor_counters``.

Two deliberate widenings where Conveyor creates the tables (Celery reads both unchanged):
results are LONGBLOB on MySQL/MariaDB (Celery's BLOB stops at 64 KiB) and datetimes keep
microseconds there (``DATETIME(6)``; plain DATETIME rounds to the second).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Row

from conveyor import states

logger = logging.getLogger("conveyor.backends.sql")

TASK_TABLE = "celery_taskmeta"
GROUP_TABLE = "celery_tasksetmeta"
COUNTER_TABLE = "conveyor_counters"

# Celery's model: INTEGER ids. BIGINT where Conveyor creates the table (a sequence of two
# billion results is reachable), except on SQLite, whose AUTOINCREMENT needs INTEGER.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_DATETIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
NAME_LENGTH = 155
"""Celery's VARCHAR length for ids, task names, worker and queue names."""


@dataclass(frozen=True, slots=True)
class Tables:
    metadata: sa.MetaData
    task: sa.Table
    group: sa.Table
    counter: sa.Table
    expires_index: sa.Index


def build_tables(names: Mapping[str, str], schemas: Mapping[str, str | None]) -> Tables:
    """Tables named as Celery's ``database_table_names``/``database_table_schemas`` say.

    ``names``/``schemas`` take the keys ``task`` and ``group`` (Celery's) and ``counter``
    (Conveyor's; its schema defaults to the task table's).
    """
    metadata = sa.MetaData()
    task_schema = schemas.get("task")
    group_schema = schemas.get("group")
    task_name = names.get("task") or TASK_TABLE
    task = sa.Table(
        task_name,
        metadata,
        sa.Column(
            "id",
            _ID,
            sa.Sequence("task_id_sequence", schema=task_schema),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("task_id", sa.String(NAME_LENGTH), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", _BLOB, nullable=True),
        sa.Column("date_done", _DATETIME, nullable=True, index=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("children", _BLOB, nullable=True),
        sa.Column("name", sa.String(NAME_LENGTH), nullable=True),
        sa.Column("args", _BLOB, nullable=True),
        sa.Column("kwargs", _BLOB, nullable=True),
        sa.Column("worker", sa.String(NAME_LENGTH), nullable=True),
        sa.Column("retries", sa.Integer, nullable=True),
        sa.Column("queue", sa.String(NAME_LENGTH), nullable=True),
        sa.Column("stamps", _BLOB, nullable=True),
        sa.Column("group_id", sa.String(NAME_LENGTH), nullable=True),
        sa.Column("parent_id", sa.String(NAME_LENGTH), nullable=True),
        sa.Column("expires_at", _DATETIME, nullable=True),
        schema=task_schema,
        sqlite_autoincrement=True,
    )
    # Named after the table so several table sets can share one schema.
    expires_index = sa.Index(f"ix_{task_name}_expires_at", task.c.expires_at)
    group = sa.Table(
        names.get("group") or GROUP_TABLE,
        metadata,
        sa.Column(
            "id",
            _ID,
            sa.Sequence("taskset_id_sequence", schema=group_schema),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("taskset_id", sa.String(NAME_LENGTH), unique=True),
        sa.Column("result", _BLOB, nullable=True),
        sa.Column("date_done", _DATETIME, nullable=True, index=True),
        schema=group_schema,
        sqlite_autoincrement=True,
    )
    counter = sa.Table(
        names.get("counter") or COUNTER_TABLE,
        metadata,
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("expires_at", _DATETIME, nullable=True),
        schema=schemas.get("counter", task_schema),
    )
    return Tables(metadata, task, group, counter, expires_index)


def create_tables(connection: Connection, tables: Tables) -> None:
    """Create what is missing: tables, then Conveyor's columns on an existing task table.

    Runs once per backend, on first use. Another process may be creating the same tables
    at the same moment; the caller retries on an error and this runs again, finding them.
    """
    tables.metadata.create_all(connection, checkfirst=True)
    inspector = sa.inspect(connection)
    task = tables.task
    present = {column["name"] for column in inspector.get_columns(task.name, schema=task.schema)}
    missing = [column for column in task.columns if column.name not in present]
    preparer = connection.dialect.identifier_preparer
    for column in missing:
        # A table Celery created: add Conveyor's columns (all nullable), and the extended
        # ones an older Celery did not create, as Celery itself does on startup.
        logger.info("adding column %s to %s", column.name, task.fullname)
        connection.execute(
            sa.text(
                f"ALTER TABLE {preparer.format_table(task)} ADD COLUMN "
                f"{preparer.quote(column.name)} {column.type.compile(connection.dialect)}"
            )
        )
    indexes = {index["name"] for index in inspector.get_indexes(task.name, schema=task.schema)}
    if tables.expires_index.name not in indexes:
        tables.expires_index.create(connection, checkfirst=True)


# -- the result document <-> a row (Celery's column encodings) ------------------------------
Dump = Callable[[Any], bytes]
Load = Callable[[bytes], Any]

EXTENDED_FIELDS = ("name", "args", "kwargs", "worker", "retries", "queue")


def naive_utc(value: Any) -> datetime | None:
    """Celery's ``date_done`` column: a naive datetime in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    moment: datetime = value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def iso_utc(value: datetime) -> str:
    """Back to the document's form: ISO-8601 with ``+00:00``, as ``build_meta`` writes it."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC).isoformat()
    return value.astimezone(UTC).isoformat()


def _clip(value: Any) -> str | None:
    # Informational columns are VARCHAR(155): a long worker name must not lose a result.
    return None if value is None else str(value)[:NAME_LENGTH]


def row_from_meta(
    task_id: str, meta: Mapping[str, Any], dump: Dump, now: datetime
) -> dict[str, Any]:
    """Column values for a result document; raises EncodeError before anything is written.

    ``result`` holds the value only, and ``children``/``args``/``kwargs``/``stamps`` their
    own serialized values, as Celery writes them. A state that is not ready still gets
    ``date_done = now`` (Celery's column default does the same), so cleanup can find stale
    STARTED and RETRY rows; readers see ``date_done`` only for ready states.
    """
    children = meta.get("children")
    # build_meta(extended=True) writes all six extended keys, even when a value is None.
    extended = "name" in meta
    stamped = meta.get("stamped_headers")
    stamps = None
    if stamped:
        stamps = dump(
            {
                "stamped_headers": list(stamped),
                "stamps": {header: meta[header] for header in stamped if header in meta},
            }
        )
    retries = meta.get("retries")
    traceback = meta.get("traceback")
    return {
        "task_id": task_id,
        "status": str(meta.get("status") or states.PENDING),
        "result": dump(meta.get("result")),
        "date_done": naive_utc(meta.get("date_done")) or now,
        "traceback": None if traceback is None else str(traceback),
        "children": dump(children) if children else None,
        "name": _clip(meta.get("name")),
        "args": dump(meta.get("args")) if extended else None,
        "kwargs": dump(meta.get("kwargs")) if extended else None,
        "worker": _clip(meta.get("worker")),
        "retries": retries if isinstance(retries, int) else None,
        "queue": _clip(meta.get("queue")),
        "stamps": stamps,
        "group_id": _clip(meta.get("group_id")),
        "parent_id": _clip(meta.get("parent_id")),
    }


def meta_from_row(row: Row[Any], load: Load) -> dict[str, Any]:
    """The result document in Celery's field order, from a row either side wrote."""
    status = row.status or states.PENDING
    meta: dict[str, Any] = {
        "status": status,
        "result": None if row.result is None else load(row.result),
        "traceback": row.traceback,
        # Celery writes NULL for "no children"; the document always has a list.
        "children": [] if row.children is None else load(row.children),
        "date_done": (
            iso_utc(row.date_done)
            if status in states.READY_STATES and row.date_done is not None
            else None
        ),
    }
    if row.group_id is not None:
        meta["group_id"] = row.group_id
    if row.parent_id is not None:
        meta["parent_id"] = row.parent_id
    # Celery and Conveyor both serialize args/kwargs (even None) in extended mode only.
    if any(getattr(row, field) is not None for field in EXTENDED_FIELDS):
        meta.update(
            name=row.name,
            args=None if row.args is None else load(row.args),
            kwargs=None if row.kwargs is None else load(row.kwargs),
            worker=row.worker,
            retries=row.retries,
            queue=row.queue,
        )
    if row.stamps is not None:
        stamps = load(row.stamps)
        if isinstance(stamps, dict):
            meta["stamped_headers"] = stamps.get("stamped_headers")
            if isinstance(stamps.get("stamps"), dict):
                meta.update(stamps["stamps"])
    meta["task_id"] = row.task_id
    return meta
