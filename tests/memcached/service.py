"""A memcached for the tests: ``scripts/memcached`` installs and starts one on loopback."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from tests.conftest import MEMCACHED_ADDRESS, require_service

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "memcached"
HOST, _, _PORT = MEMCACHED_ADDRESS.rpartition(":")
PORT = int(_PORT)
URL = f"cache+memcached://{MEMCACHED_ADDRESS}/"


@functools.cache
def _start() -> None:
    if HOST not in {"127.0.0.1", "localhost"}:
        return  # a server somewhere else is its owner's to run
    env = {**os.environ, "CONVEYOR_MEMCACHED_PORT": str(PORT)}
    # A failure shows up below as "not reachable": skipped locally, a failure in CI.
    subprocess.run([str(SCRIPT)], env=env, check=False, timeout=600)


def require_memcached() -> str:
    """Start memcached once per session if needed; skip (or fail in CI) without it."""
    _start()
    require_service("Memcached", HOST, PORT)
    return URL
