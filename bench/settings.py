"""What the harness tells the task apps, through environment variables.

The harness, the driver process and every worker read the same variables, so a worker
started as a user starts it (``conveyor -A bench.systems.conveyor_app worker ...``)
finds its broker, its queues and the counter without any argument of ours. The names
start with ``BENCH_``, never ``CONVEYOR_``: Conveyor reads every ``CONVEYOR_*`` variable
as a setting and refuses unknown ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672

# Redis database 14 holds everything the harness writes to Redis (counters, the Redis
# brokers' queues, results): the tests use 13, and other work on this machine uses 0.
BENCH_REDIS_DB = 14
BENCH_REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BENCH_REDIS_DB}"
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/"

ENV_BROKER = "BENCH_BROKER"  # sqlite | redis | amqp
ENV_BROKER_URL = "BENCH_BROKER_URL"
ENV_BACKEND_URL = "BENCH_BACKEND_URL"
ENV_QUEUE = "BENCH_QUEUE"  # noop and add: the drain and round-trip queue
ENV_BULK_QUEUE = "BENCH_BULK_QUEUE"  # bulk enqueue goes here, and is purged unread
ENV_IO_QUEUE = "BENCH_IO_QUEUE"  # io10
ENV_COUNTER_URL = "BENCH_COUNTER_URL"
ENV_COUNTER_KEY = "BENCH_COUNTER_KEY"


@dataclass(frozen=True)
class AppEnv:
    """The variables, read once by a task app module at import time."""

    broker: str
    broker_url: str
    backend_url: str
    queue: str
    bulk_queue: str
    io_queue: str
    counter_url: str
    counter_key: str

    @classmethod
    def read(cls) -> AppEnv:
        # Defaults let a module be imported on its own (a linter, a REPL); the harness
        # always sets every variable.
        get = os.environ.get
        return cls(
            broker=get(ENV_BROKER, "redis"),
            broker_url=get(ENV_BROKER_URL, BENCH_REDIS_URL),
            backend_url=get(ENV_BACKEND_URL, BENCH_REDIS_URL),
            queue=get(ENV_QUEUE, "bench"),
            bulk_queue=get(ENV_BULK_QUEUE, "bench_bulk"),
            io_queue=get(ENV_IO_QUEUE, "bench_io"),
            counter_url=get(ENV_COUNTER_URL, BENCH_REDIS_URL),
            counter_key=get(ENV_COUNTER_KEY, "bench:counter"),
        )
