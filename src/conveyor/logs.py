"""Logging as the ``conveyor`` command sets it up. The library itself never configures
logging; only the command line does, for the worker and for its child processes."""

from __future__ import annotations

import logging
import sys

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


def setup_logging(level: str | int) -> None:
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level,
                        format=FORMAT, stream=sys.stderr, force=True)
