"""Processes of one worker take turns waiting for new messages.

Where each process of a prefork worker is woken by the broker itself (Redis client-side
caching notices), one push would wake every idle process, and each would run a fetch
that all but one find empty: on a two-core machine that work delays the one that got
the message. With a gate, one idle process at a time listens; the others wait here until
it leaves with messages, or stops.

The gate is an ``flock`` on a file: the kernel releases it when its holder exits, however
it exits, so a killed process can never leave its siblings locked out. A FIFO beside it
is the doorbell that tells waiters the gate was let go; without a ring (a holder killed)
they try again every :data:`RETRY` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import tempfile
import time
from pathlib import Path

RETRY = 0.25
"""Seconds between tries when no ring comes: bounds the wait after a holder died."""

_LOCK_NAME = "gate"
_BELL_NAME = "bell"


def create_gate_directory() -> str:
    """A private directory for one worker's gate (owner-only), made by its supervisor."""
    directory = tempfile.mkdtemp(prefix="conveyor-gate-")
    Path(directory, _LOCK_NAME).touch(mode=0o600)
    os.mkfifo(Path(directory, _BELL_NAME), mode=0o600)
    return directory


def remove_gate_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class IdleGate:
    """One process's handle on the shared gate; used by one thread at a time."""

    def __init__(self, directory: str) -> None:
        # Opened by each process itself: an flock belongs to an open file, so a file
        # inherited from the supervisor would be one lock shared by everyone.
        self._lock_fd = os.open(Path(directory, _LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
        # Read-write, so opening a FIFO never blocks and it never reads as closed.
        self._bell_fd = os.open(
            Path(directory, _BELL_NAME), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
        )
        self.held = False

    def acquire(self, timeout: float, interrupt_fd: int | None = None) -> bool:
        """Take the gate, waiting at most ``timeout`` seconds; True if taken. A waiting
        call also ends, without the gate, when ``interrupt_fd`` turns readable."""
        if self.held:
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                self.held = True
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            watched = [self._bell_fd] if interrupt_fd is None else [self._bell_fd, interrupt_fd]
            readable, _, _ = select.select(watched, [], [], min(remaining, RETRY))
            if interrupt_fd is not None and interrupt_fd in readable:
                return False
            if self._bell_fd in readable:
                # One ring per release: whoever reads it tries first; a ring left from a
                # release nobody waited for costs one extra try.
                with contextlib.suppress(BlockingIOError):
                    os.read(self._bell_fd, 1)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        with contextlib.suppress(BlockingIOError):  # a full FIFO already rings
            os.write(self._bell_fd, b"!")

    def close(self) -> None:
        self.release()
        for fd in (self._lock_fd, self._bell_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
