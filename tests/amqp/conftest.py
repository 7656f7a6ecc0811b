"""Fixtures for the RabbitMQ tests: a private vhost per test, interop apps on both sides,
and real Celery / Conveyor worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.interop_settings import interop_env
from tests.amqp.vhosts import new_vhost, vhost_url

from conveyor import Conveyor
from conveyor.brokers.amqp import AmqpBroker

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def vhost(amqp_service: str) -> str:
    """A vhost of this test alone (deleted when the test run ends)."""
    return new_vhost()


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return vhost_url(vhost)


@pytest.fixture
def connect(amqp_url: str) -> Iterator[Callable[[], AmqpBroker]]:
    """Open AmqpBroker objects on this test's vhost; all are closed after the test."""
    opened: list[AmqpBroker] = []

    def open_broker() -> AmqpBroker:
        broker = AmqpBroker(amqp_url)
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


@pytest.fixture
def interop(amqp_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Environment (here and for worker processes) that points both apps at this vhost."""
    values = interop_env(amqp_url, str(tmp_path))
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def conveyor_app(interop: dict[str, str]) -> Iterator[Conveyor]:
    from tests.amqp.conveyor_app import make_app

    app = make_app()
    yield app
    app.close()


@pytest.fixture
def celery_client(interop: dict[str, str]) -> Iterator[Any]:
    """A Celery app of this process, to send tasks and read results as Celery does."""
    from celery import Celery
    from tests.amqp.celery_app import celery_settings

    app = Celery("interop-client", set_as_current=False)
    app.conf.update(celery_settings())
    yield app
    close_celery(app)
    app.close()


def close_celery(app: Any) -> None:
    """Close the connection Celery's rpc:// result consumer opened (app.close() doesn't)."""
    backend = app._backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None and consumer._connection is not None:
        consumer.stop()


class ProcessWorker:
    """A worker process (Celery's or ours) logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str) -> None:
        self.log = log
        self.name = ""
        with log.open("ab") as handle:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
            )
        self.wait_for(ready)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_celery_worker(env: dict[str, str], log: Path, *args: str) -> ProcessWorker:
    # -P threads -c 1: one task at a time, in order. (With -P solo, Celery 5.7 on
    # RabbitMQ holds the ack of its first task for ~10 s, stalling a prefetch of 1.)
    name = f"celery-{os.getpid()}-{time.monotonic_ns()}@{socket.gethostname()}"
    argv = [
        str(BIN / "celery"),
        "-A",
        "tests.amqp.celery_app",
        "worker",
        "-P",
        "threads",
        "-c",
        "1",
        "-l",
        "info",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-n",
        name,
        *args,
    ]
    worker = ProcessWorker(argv, env, log, " ready.")
    worker.name = name
    return worker


def start_conveyor_worker(env: dict[str, str], log: Path, *args: str) -> ProcessWorker:
    argv = [
        sys.executable,
        "-m",
        "conveyor",
        "-A",
        "tests.amqp.conveyor_app",
        "worker",
        "-l",
        "info",
        *args,
    ]
    return ProcessWorker(argv, env, log, " ready: ")


@pytest.fixture
def processes() -> Iterator[list[ProcessWorker]]:
    """Worker processes a test starts; any still running at the end are killed."""
    started: list[ProcessWorker] = []
    yield started
    for worker in started:
        worker.kill()
