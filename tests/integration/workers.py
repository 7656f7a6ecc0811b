"""Starting real ``conveyor worker`` processes from tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.text()}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def conveyor_command(args: Sequence[str], env: dict[str, str], *, timeout: float = 30.0,
                     input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conveyor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, input=input_text,
                          check=False)


def start_worker(env: dict[str, str], log: Path, *args: str) -> WorkerProcess:
    handle = log.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "-A", "tests.apps.proc_app", "worker",
         "-l", "info", *args],
        cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    worker = WorkerProcess(process, log)
    worker.wait_for_log(" ready: ")
    return worker


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
