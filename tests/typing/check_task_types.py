"""Checked by mypy (scripts/test), never run: the task API's types are part of the API.

``--warn-unused-ignores`` makes each ``type: ignore`` below an assertion that the line
is a type error.
"""

from __future__ import annotations

from typing import assert_type

from conveyor import AsyncResult, AsyncTask, Conveyor, Task

app = Conveyor("typing", broker="memory://", backend="memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
async def fetch(url: str) -> bytes:
    return url.encode()


@app.task(bind=True, max_retries=5)
def bound(self: Task[..., str], name: str) -> str:
    return name


def check() -> None:
    task: Task[[int, int], int] = add
    async_task: AsyncTask[[str], bytes] = fetch
    assert_type(task.delay(1, 2), AsyncResult[int])
    assert_type(async_task.delay("u"), AsyncResult[bytes])
    assert_type(add.delay(1, 2), AsyncResult[int])
    assert_type(add.delay(1, 2).get(timeout=1), int)
    assert_type(fetch.delay("u").get(), bytes)
    assert_type(add(1, 2), int)
    assert_type(bound.delay("x").get(), str)
    add.delay(1, "x")  # type: ignore[arg-type]
    add.delay(1)  # type: ignore[call-arg]
    fetch.delay(3)  # type: ignore[arg-type]


async def acheck() -> None:
    result = await add.adelay(1, 2)
    assert_type(result, AsyncResult[int])
    assert_type(await result.aget(), int)
    assert_type(await fetch("u"), bytes)
