"""Celery's side: ``celery -A bench.systems.celery_app worker ...``."""

from __future__ import annotations

import time

from celery import Celery

from bench.settings import AppEnv
from bench.systems.counter import incr

env = AppEnv.read()

app = Celery("bench", broker=env.broker_url, backend=env.backend_url)
app.conf.update(
    task_default_queue=env.queue,
    result_expires=600,
    # Celery 5.x warns at start-up unless this is said explicitly; the value is its default.
    broker_connection_retry_on_startup=True,
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
def io10() -> None:
    # Celery has no native async tasks; its I/O setting is a pool of threads (or gevent,
    # which the bench extra does not install).
    time.sleep(0.01)
    incr(env)
