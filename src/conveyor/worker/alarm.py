"""The one real-time timer of a prefork process, shared by two deadlines of a job.

A process has one ``ITIMER_REAL``, and its SIGALRM is handled in the main thread, where
the job runs. Two things need it while a job runs:

* the job's soft time limit: SoftTimeLimitExceeded is raised inside the task;
* the moment the process stops keeping the watch for new messages it kept after a fetch
  that emptied the queue (see :meth:`~conveyor.brokers.base.Broker.idle_wait_kept_until`):
  a job that runs longer than that lets a sibling process take over the watch.

A timer armed only for what is due, and never for a job that needs neither, costs a job
no system call.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from conveyor.errors import SoftTimeLimitExceeded

logger = logging.getLogger("conveyor.worker")


class JobAlarm:
    """Arm for a job, disarm after it; :meth:`install` once, in the main thread."""

    def __init__(self) -> None:
        self._soft_at: float | None = None
        self._hand_over_at: float | None = None
        self._hand_over: Callable[[], None] | None = None
        self._armed = False

    def install(self) -> None:
        signal.signal(signal.SIGALRM, self._fire)

    def arm(self, soft_time_limit: float | None, hand_over_at: float | None,
            hand_over: Callable[[], None]) -> None:
        """``soft_time_limit`` in seconds from now; ``hand_over_at`` a monotonic time,
        when ``hand_over`` is called (at once if that time has passed)."""
        now = time.monotonic()
        if hand_over_at is not None and hand_over_at <= now:
            _hand_over_now(hand_over)
            hand_over_at = None
        self._soft_at = now + soft_time_limit if soft_time_limit else None
        self._hand_over_at = hand_over_at
        self._hand_over = hand_over
        self._set(now)

    def disarm(self) -> None:
        self._soft_at = self._hand_over_at = None
        self._hand_over = None
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _set(self, now: float) -> None:
        due = [at for at in (self._soft_at, self._hand_over_at) if at is not None]
        if due:
            self._armed = True
            # Never zero: that would disarm the timer instead of firing it.
            signal.setitimer(signal.ITIMER_REAL, max(1e-6, min(due) - now))
        elif self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _fire(self, signum: int, frame: Any) -> None:
        # A signal that was already on its way when the job ended finds nothing due.
        self._armed = False
        now = time.monotonic()
        hand_over = self._hand_over
        if self._hand_over_at is not None and now >= self._hand_over_at:
            self._hand_over_at = None
            if hand_over is not None:
                _hand_over_now(hand_over)
        if self._soft_at is not None and now >= self._soft_at:
            self._soft_at = None
            self._set(now)
            raise SoftTimeLimitExceeded("soft time limit exceeded")
        self._set(now)


def _hand_over_now(hand_over: Callable[[], None]) -> None:
    try:
        hand_over()
    except Exception:  # raised in the job, it would end the task: only report it
        logger.exception("Could not hand the idle wait over to a sibling")
