"""How each system is set up on each broker, and the worker commands a user would type.

This is the one place that says which broker URL, which result backend and which pool
each system gets; RESULTS.md prints the same choices.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.settings import AMQP_URL, BENCH_REDIS_URL

SYSTEMS = ("conveyor", "celery", "dramatiq")
BROKERS = ("sqlite", "redis", "amqp")

# Celery's SQLAlchemy transport is experimental and Dramatiq has no SQL broker, so the
# SQLite broker (Conveyor's default) is measured for Conveyor alone.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "conveyor": ("sqlite", "redis", "amqp"),
    "celery": ("redis", "amqp"),
    "dramatiq": ("redis", "amqp"),
}

DRAIN_CONCURRENCY = 2
IO_CONCURRENCY = 100


@dataclass(frozen=True)
class Setup:
    system: str
    broker: str
    broker_url: str
    backend_url: str
    backend_note: str


def setup_for(system: str, broker: str, sqlite_path: Path) -> Setup:
    """The URLs ``system`` uses on ``broker``; ``sqlite_path`` is a fresh database file."""
    if broker == "sqlite":
        url = f"sqlite:///{sqlite_path}"
        # Results beside the messages, Conveyor's default.
        return Setup(system, broker, url, url, "SQLite (same file)")
    if broker == "redis":
        return Setup(system, broker, BENCH_REDIS_URL, BENCH_REDIS_URL, "Redis")
    # RabbitMQ. Conveyor and Celery: rpc://, results sent back over RabbitMQ itself.
    # Conveyor's docs (docs/amqp.md) name no faster backend; rpc:// and redis:// measured
    # even here (round-trip p50 1.7-2.0 against 1.6-2.7 ms), and rpc:// keeps the cell on
    # one broker, as Celery's is. Celery's docs recommend rpc:// for RPC-style calls, and
    # it measured at least as fast as redis:// here (p50 2.0-3.4 against 2.2-3.7 ms).
    # Dramatiq: Redis, its only result store besides Memcached.
    if system in ("conveyor", "celery"):
        return Setup(system, broker, AMQP_URL, "rpc://", "rpc:// (replies over RabbitMQ)")
    return Setup(system, broker, AMQP_URL, BENCH_REDIS_URL, "Redis")


def _tool(name: str) -> str:
    """The console script of the interpreter running the harness (the virtualenv's)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is not installed: pip install -e '.[bench]'")
    return found


def drain_command(system: str, queue: str) -> list[str]:
    """A worker with 2 processes, as each system's docs start one."""
    c = str(DRAIN_CONCURRENCY)
    if system == "conveyor":
        return [_tool("conveyor"), "-A", "bench.systems.conveyor_app", "worker",
                "-c", c, "-P", "prefork", "-Q", queue]
    if system == "celery":
        return [_tool("celery"), "-A", "bench.systems.celery_app", "worker",
                "-c", c, "-P", "prefork", "-Q", queue]
    if system == "dramatiq":
        # Dramatiq's own default is 8 threads per process.
        return [_tool("dramatiq"), "bench.systems.dramatiq_app", "--processes", c,
                "--threads", "8", "--queues", queue]
    raise ValueError(system)


def io_command(system: str, queue: str) -> list[str]:
    """Each system's best setting for 100 concurrent 10 ms waits."""
    n = str(IO_CONCURRENCY)
    if system == "conveyor":
        return [_tool("conveyor"), "-A", "bench.systems.conveyor_app", "worker",
                "-c", n, "-P", "asyncio", "-Q", queue]
    if system == "celery":
        # gevent/eventlet are Celery's other I/O pools; neither is installed here.
        return [_tool("celery"), "-A", "bench.systems.celery_app", "worker",
                "-c", n, "-P", "threads", "-Q", queue]
    if system == "dramatiq":
        # 2 processes x 50 threads: it measured 20-40% ahead of 1 x 100 on this machine
        # (3,500-4,100 against 2,700-2,900 tasks/s, Redis, 5,000 tasks), since one
        # process's GIL and consumer thread become the limit.
        half = str(IO_CONCURRENCY // 2)
        return [_tool("dramatiq"), "bench.systems.dramatiq_app", "--processes", "2",
                "--threads", half, "--queues", queue]
    raise ValueError(system)


def shown(command: list[str]) -> str:
    """A command as a user types it: the tool's name, not the virtualenv's path."""
    return " ".join([Path(command[0]).name, *command[1:]])
