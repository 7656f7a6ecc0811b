"""How long to wait before a retry: Celery's exponential backoff with full jitter. Pure."""

from __future__ import annotations

import random


def backoff_countdown(
    factor: float,
    retries: int,
    maximum: float,
    *,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """``min(maximum, factor * 2**retries)``, jittered uniformly down to 0 when asked.

    Full jitter spreads a herd of tasks that failed together over the whole window, so
    they do not all hit the recovering service at the same instant.
    """
    countdown = min(maximum, factor * (2 ** retries))
    if jitter:
        countdown = (rng or random).uniform(0, countdown)
    return max(0.0, float(countdown))
