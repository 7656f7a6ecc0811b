"""Calling a broker or backend that may be briefly down: retry with backoff, and say so."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_with_retry(
    call: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    max_retries: int,
    first_delay: float,
    max_delay: float,
    what: str,
    logger: logging.Logger,
) -> T:
    """Call; on a ``retry_on`` error wait (doubling, jittered) and try again, up to
    ``max_retries`` times, logging each wait. The last error is raised."""
    delay = first_delay
    attempt = 0
    while True:
        try:
            return call()
        except retry_on as exc:
            if attempt >= max_retries:
                raise
            attempt += 1
            pause = delay * random.uniform(0.5, 1.0) if delay else 0.0
            logger.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt,
                           max_retries, pause)
            time.sleep(pause)
            delay = min(max(delay * 2, first_delay or 0.01), max_delay)
