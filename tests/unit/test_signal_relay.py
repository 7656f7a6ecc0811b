"""Shutdown signals are handled in a thread, so a signal can land anywhere in the main
thread without deadlocking on a lock that thread holds."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

# The main thread holds the event's own lock when the signal lands, as it does inside
# Event.wait() or Event.set(). A handler that set the event itself would wait forever.
SCRIPT = textwrap.dedent("""
    import os, signal, threading, time
    from conveyor.worker.signal_relay import relay_signals

    stopping = threading.Event()
    seen = []

    def on_signal(signum):
        seen.append(signum)
        stopping.set()

    relay_signals(on_signal, signal.SIGTERM, signal.SIGINT)
    with stopping._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # both handlers run here, in this thread
    assert stopping.wait(5)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    print(sorted(seen) == sorted([signal.SIGTERM, signal.SIGINT]))
""")


def test_a_signal_landing_while_the_main_thread_holds_the_lock_is_handled() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True,
                          text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"



REINSTALL = textwrap.dedent("""
    import os, signal, threading, time
    from conveyor.worker.signal_relay import relay_signals

    calls = []
    relay_signals(lambda signum: calls.append(("first", signum)), signal.SIGTERM)
    relay_signals(lambda signum: calls.append(("second", signum)), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    relays = [t for t in threading.enumerate() if t.name == "conveyor-signals"]
    print(calls == [("second", signal.SIGTERM)], len(relays))
""")


def test_installing_again_replaces_the_callback_and_keeps_one_thread() -> None:
    done = subprocess.run([sys.executable, "-c", REINSTALL], check=False,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1"]


FORKED = textwrap.dedent("""
    import os, signal, threading, time
    from conveyor.worker.signal_relay import relay_signals

    relay_signals(lambda signum: None, signal.SIGTERM)
    pid = os.fork()
    if pid == 0:
        time.sleep(30)  # a SIGTERM ends it, as it would any process
        os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_gets_the_default_handling_back() -> None:
    done = subprocess.run([sys.executable, "-c", FORKED], check=False,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM)
