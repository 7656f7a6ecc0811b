"""Shared fixtures: real services on loopback, and a rule for when they are missing.

With ``CI=true`` a missing service is a failure, never a skip: CI must prove every
broker and backend. Locally, tests for a service that is down are skipped with a reason.
"""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

REDIS_URL = os.environ.get("CONVEYOR_TEST_REDIS", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get("CONVEYOR_TEST_POSTGRES",
                              "postgresql+psycopg://root@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("CONVEYOR_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
MEMCACHED_ADDRESS = os.environ.get("CONVEYOR_TEST_MEMCACHED", "127.0.0.1:11211")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (in CI) when a service does not answer."""
    if port_open(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must run every test (see scripts/test)")
    pytest.skip(message)


@pytest.fixture
def redis_service() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def amqp_service() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL
