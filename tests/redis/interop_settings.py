"""Where the interop apps connect: one Redis URL and one key prefix, from the environment.

``INTEROP_REDIS_URL`` (default: the test Redis, database 13), ``INTEROP_PREFIX`` (the
``global_keyprefix`` of broker and backend, so each test has its own keys) and
``INTEROP_VISIBILITY_TIMEOUT``. Both apps read the same variables, so a Celery worker and
a Conveyor worker started with one environment share queues and results.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_URL = os.environ.get("CONVEYOR_TEST_REDIS", "redis://127.0.0.1:6379/13")


def interop_env(url: str, prefix: str, visibility_timeout: float = 3600.0) -> dict[str, str]:
    return {
        "INTEROP_REDIS_URL": url,
        "INTEROP_PREFIX": prefix,
        "INTEROP_VISIBILITY_TIMEOUT": str(visibility_timeout),
    }


def interop_settings() -> dict[str, Any]:
    """Setting names shared by Celery and Conveyor."""
    url = os.environ.get("INTEROP_REDIS_URL", DEFAULT_URL)
    prefix = os.environ.get("INTEROP_PREFIX", "conveyor-test:interop:")
    timeout = float(os.environ.get("INTEROP_VISIBILITY_TIMEOUT", "3600"))
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": {"global_keyprefix": prefix, "visibility_timeout": timeout},
        "result_backend_transport_options": {"global_keyprefix": prefix},
        "result_extended": True,
        "result_expires": 600,  # on the shared server, stragglers expire soon
        "worker_prefetch_multiplier": 1,
    }
