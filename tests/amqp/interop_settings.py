"""Where the AMQP interop apps connect, from the environment.

``INTEROP_AMQP_URL`` names the broker, on a vhost of the test's own; results travel back
through the rpc:// backend on both sides (``INTEROP_RESULT_BACKEND`` to change that).
``INTEROP_RECORD_DIR`` is where tasks that leave
traces write them. Both apps read the same variables, so a Celery
worker and a Conveyor worker started with one environment share queues.
"""

from __future__ import annotations

import os
from typing import Any

from tests.conftest import AMQP_URL

PRIORITY_QUEUE = "prio"
MAX_PRIORITY = 9


def interop_env(url: str, record_dir: str) -> dict[str, str]:
    return {"INTEROP_AMQP_URL": url, "INTEROP_RECORD_DIR": record_dir}


def interop_settings() -> dict[str, Any]:
    """Setting names shared by Celery and Conveyor."""
    return {
        "broker_url": os.environ.get("INTEROP_AMQP_URL", AMQP_URL),
        "result_backend": os.environ.get("INTEROP_RESULT_BACKEND", "rpc://"),
        "result_extended": True,
        "worker_prefetch_multiplier": 1,
    }
