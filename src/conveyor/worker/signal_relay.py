"""Shutdown signals handled in a thread of their own, not in the signal handler.

A Python signal handler runs in the main thread between two bytecodes, wherever that
thread was: inside ``Event.wait`` or ``Event.set`` holding the event's lock, or inside an
earlier handler (two SIGTERMs a millisecond apart: a service manager's and the
supervisor's). A handler that sets an event there waits forever for a lock its own
thread holds. The handler here only writes the signal's number to a pipe, which takes
no lock; a thread reads it and does the work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("conveyor.worker")


class SignalRelay:
    """Calls ``on_signal(signum)`` in its own thread for each signal installed."""

    def __init__(self, on_signal: Callable[[int], None], name: str = "conveyor-signals") -> None:
        self._on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def install(self, *signums: int) -> None:
        """Handle ``signums`` (from the main thread, as ``signal.signal`` requires)."""
        for signum in signums:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):  # a full pipe: the thread has plenty to read
            os.write(self._write, bytes([signum]))

    def _run(self) -> None:
        while True:
            try:
                received = os.read(self._read, 64)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                try:
                    self._on_signal(signum)
                except Exception:
                    logger.exception("Handling signal %s failed", signum)
