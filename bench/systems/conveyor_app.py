"""Conveyor's side: ``conveyor -A bench.systems.conveyor_app worker ...``."""

from __future__ import annotations

import asyncio

from bench.settings import AppEnv
from bench.systems.counter import aincr, incr
from conveyor import Conveyor

env = AppEnv.read()

app = Conveyor(
    "bench",
    broker=env.broker_url,
    backend=env.backend_url,
    task_default_queue=env.queue,
    # Round-trip results are read at once; nothing needs to keep them for a day.
    result_expires=600.0,
)


@app.task(ignore_result=True)
def noop() -> None:
    incr(env)


@app.task(ignore_result=True, acks_late=True)
def noop_late() -> None:
    # The same no-op, acknowledged after it returns rather than before it starts.
    incr(env)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(ignore_result=True, queue=env.io_queue)
async def io10() -> None:
    # Native async: on ``-P asyncio`` a hundred of these share one event loop.
    await asyncio.sleep(0.01)
    await aincr(env)
