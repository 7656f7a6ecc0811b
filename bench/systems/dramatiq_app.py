"""Dramatiq's side: ``dramatiq bench.systems.dramatiq_app --processes 2 --threads 8``."""

from __future__ import annotations

import time

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from bench.settings import AppEnv
from bench.systems.counter import incr

env = AppEnv.read()


def _make_broker() -> dramatiq.Broker:
    # Dramatiq has no SQLite broker; the harness never asks for one.
    if env.broker == "amqp":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=env.broker_url)
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=env.broker_url)


broker = _make_broker()
# Results live in Redis on either broker: Dramatiq's result backends are Redis and
# Memcached only.
broker.add_middleware(Results(backend=RedisBackend(url=env.backend_url), result_ttl=600_000))
dramatiq.set_broker(broker)


# max_retries=0: a failure must show up as a missing count, not as a quiet retry.
@dramatiq.actor(queue_name=env.queue, max_retries=0)
def noop() -> None:
    incr(env)


@dramatiq.actor(queue_name=env.queue, max_retries=0, store_results=True)
def add(x: int, y: int) -> int:
    return x + y


@dramatiq.actor(queue_name=env.io_queue, max_retries=0)
def io10() -> None:
    # Dramatiq's async actors still hold a worker thread while they wait, so threads are
    # its I/O concurrency either way; a plain sleep is its usual form.
    time.sleep(0.01)
    incr(env)
