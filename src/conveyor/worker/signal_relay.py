"""Shutdown signals handled in a thread of their own, not in the signal handler.

A Python signal handler runs in the main thread between two bytecodes, wherever that
thread was: inside ``Event.wait`` or ``Event.set`` holding the event's lock, or inside an
earlier handler (two SIGTERMs a millisecond apart: a service manager's and the
supervisor's). A handler that sets an event there waits forever for a lock its own
thread holds. The handler here only writes the signal's number to a pipe, which takes
no lock; a thread reads it and calls what was installed for that signal.
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

_lock = threading.Lock()
_callbacks: dict[int, Callable[[int], None]] = {}
_pipe: list[int] = []  # [read end, write end] once the relay thread runs in this process


def relay_signals(on_signal: Callable[[int], None], *signums: int) -> None:
    """Call ``on_signal(signum)`` in the relay thread for each of ``signums`` received,
    instead of whatever handled them before. From the main thread, as ``signal.signal``
    requires. One thread per process serves every call."""
    with _lock:
        if not _pipe:
            read, write = os.pipe()
            os.set_blocking(write, False)
            _pipe[:] = [read, write]
            threading.Thread(target=_relay, args=(read,), name="conveyor-signals",
                             daemon=True).start()
        for signum in signums:
            _callbacks[signum] = on_signal
    for signum in signums:
        signal.signal(signum, _handle)


def _handle(signum: int, frame: FrameType | None) -> None:
    with contextlib.suppress(OSError, IndexError):  # a full pipe: plenty left to read
        os.write(_pipe[1], bytes([signum]))


def _relay(read: int) -> None:
    while True:
        try:
            received = os.read(read, 64)
        except OSError:
            return
        if not received:
            return
        for signum in received:
            callback = _callbacks.get(signum)
            if callback is None:
                continue
            try:
                callback(signum)
            except Exception:
                logger.exception("Handling signal %s failed", signum)


def _forget_in_child() -> None:
    # A forked child (a task's own multiprocessing, say) has no relay thread and none of
    # the parent's work to do: its signals act as in any new process, until it installs
    # handlers of its own.
    for signum in _callbacks:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)
    for fd in _pipe:
        with contextlib.suppress(OSError):
            os.close(fd)
    _pipe.clear()
    _callbacks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
