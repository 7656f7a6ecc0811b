"""The demo application that ``conveyor demo`` runs: a few tasks of every kind.

Its broker and backend come from ``CONVEYOR_BROKER_URL`` / ``CONVEYOR_RESULT_BACKEND``,
which ``conveyor demo`` sets for itself and for the worker it starts.
"""

from __future__ import annotations

import asyncio

from conveyor import Conveyor, Exchange, Queue

events = Exchange("demo.events", "topic")

app = Conveyor(
    "conveyor.demo",
    task_default_queue="demo",
    task_queues=[
        Queue("demo"),
        Queue("demo-audit", events, routing_key="audit.#"),
    ],
    task_routes={
        "conveyor.demo.audit": {"exchange": events, "routing_key": "audit.user.login"},
    },
    broker_transport_options={"visibility_timeout": 30},
)


class FlakyServiceError(IOError):
    """A made-up transient error, so the demo shows retries."""


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True, autoretry_for=(FlakyServiceError,), retry_backoff=0.05,
          retry_backoff_max=0.2, max_retries=5)
def flaky(self: object, n: int) -> int:
    """Fails on its first run, then succeeds: autoretry with backoff."""
    from conveyor.request import current_request

    if current_request().retries < 1:
        raise FlakyServiceError(f"service busy for job {n}")
    return n


@app.task
def broken(n: int) -> None:
    raise ValueError(f"job {n} is broken on purpose")


@app.task
def audit(user: str, action: str) -> str:
    """Routed through the topic exchange demo.events to the demo-audit queue."""
    return f"{user} {action}"


@app.task
async def fetch(n: int) -> int:
    await asyncio.sleep(0.005)
    return n * 2
