"""The app that worker-process tests run: ``conveyor -A tests.apps.proc_app worker``.

Broker and backend come from CONVEYOR_BROKER_URL / CONVEYOR_RESULT_BACKEND. Tasks write
to files named by their arguments so a test can count executions across processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from conveyor import Conveyor
from conveyor.errors import SoftTimeLimitExceeded

app = Conveyor("proc")


def note(path: str, line: str) -> None:
    with Path(path).open("a") as handle:
        handle.write(line + "\n")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
async def double(n: int) -> int:
    await asyncio.sleep(0.001)
    return n * 2


@app.task(acks_late=True)
def slow_once(log: str, seconds: float) -> str:
    """Slow on its first run only: a second run (after a crash) finishes at once."""
    first = not Path(log).exists()
    note(log, f"start {os.getpid()}")
    if first:
        time.sleep(seconds)
    note(log, "end")
    return "finished"


@app.task
def block(log: str, seconds: float) -> None:
    note(log, "block")
    time.sleep(seconds)


@app.task
def record(log: str, n: int) -> int:
    note(log, str(n))
    return n


@app.task
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(time_limit=1)
def overrun() -> None:
    time.sleep(30)


@app.task(soft_time_limit=0.5)
def soft_limited(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit"
    return "in time"


@app.task
def die() -> None:
    os._exit(3)


@app.task
def pid() -> int:
    return os.getpid()


@app.task(acks_late=True)
def part(n: int) -> int:
    time.sleep(0.003)
    return n


@app.task
def collect(values: list[int], log: str) -> int:
    note(log, f"{len(values)} {sum(values)} {os.getpid()}")
    return sum(values)


@app.task(acks_late=True)
def long_running(log: str, seconds: float) -> str:
    note(log, f"start {os.getpid()}")
    time.sleep(seconds)
    return "done"
