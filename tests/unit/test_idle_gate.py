"""The gate through which a prefork worker's idle processes take turns listening."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.brokers import idle_gate
from conveyor.brokers.idle_gate import (
    IdleGate,
    create_gate_directory,
    remove_gate_directory,
)


@pytest.fixture
def directory() -> Iterator[str]:
    made = create_gate_directory()
    yield made
    remove_gate_directory(made)


def test_one_holder_at_a_time_and_a_release_rings_a_waiter_in(
    directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retries so rare that only the doorbell can let the waiter in within its timeout.
    monkeypatch.setattr(idle_gate, "RETRY", 60.0)
    # Each handle opens the file itself, so two handles in one process exclude each other
    # as two processes do.
    first, second = IdleGate(directory), IdleGate(directory)
    assert first.acquire(0)
    assert first.held
    assert not second.acquire(0.05)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(second.acquire(20)))
    waiter.start()
    time.sleep(0.1)
    first.release()
    waiter.join(30)
    assert outcome == [True]
    assert second.held
    assert not first.held
    first.close()
    second.close()


def test_acquire_is_reentrant_for_its_holder_and_release_without_holding_is_harmless(
    directory: str,
) -> None:
    gate = IdleGate(directory)
    gate.release()
    assert gate.acquire(0)
    assert gate.acquire(0)
    gate.release()
    other = IdleGate(directory)
    assert other.acquire(0)  # one release was enough
    gate.close()
    other.close()


def test_a_readable_interrupt_ends_the_wait_without_the_gate(directory: str) -> None:
    holder, waiter = IdleGate(directory), IdleGate(directory)
    assert holder.acquire(0)
    read_fd, write_fd = os.pipe()
    threading.Timer(0.1, os.write, (write_fd, b"!")).start()
    began = time.monotonic()
    assert not waiter.acquire(10, read_fd)
    assert time.monotonic() - began < 5
    assert not waiter.held
    for fd in (read_fd, write_fd):
        os.close(fd)
    holder.close()
    waiter.close()


def test_closing_a_handle_lets_the_gate_go(directory: str) -> None:
    holder, waiter = IdleGate(directory), IdleGate(directory)
    assert holder.acquire(0)
    holder.close()
    assert waiter.acquire(1)
    waiter.close()


def test_a_holder_killed_outright_cannot_lock_its_siblings_out(
    directory: str, tmp_path: Path
) -> None:
    ready = tmp_path / "holding"
    code = (
        "import sys, time, pathlib\n"
        "from conveyor.brokers.idle_gate import IdleGate\n"
        "gate = IdleGate(sys.argv[1])\n"
        "assert gate.acquire(5)\n"
        "pathlib.Path(sys.argv[2]).touch()\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, directory, str(ready)])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert holder.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gate = IdleGate(directory)
        assert not gate.acquire(0.1)
        os.kill(holder.pid, signal.SIGKILL)  # no release, no ring: the kernel lets go
        holder.wait(10)
        began = time.monotonic()
        assert gate.acquire(5)
        assert time.monotonic() - began < 5
        gate.close()
    finally:
        holder.kill()
        holder.wait(10)


def test_the_directory_is_private_and_removed_whole(directory: str) -> None:
    assert os.stat(directory).st_mode & 0o077 == 0
    remove_gate_directory(directory)
    assert not os.path.exists(directory)
