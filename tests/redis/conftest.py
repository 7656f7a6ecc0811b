"""Fixtures for the Redis tests: scratch key prefixes on the shared Redis (database 13,
never flushed), interop apps on both sides, and real Celery / Conveyor worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.redis.interop_settings import interop_env
from tests.redis.scratch import delete_prefixed, scratch_prefix

from conveyor import Conveyor

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def redis_url(redis_service: str) -> str:
    return redis_service


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    value = scratch_prefix()
    yield value
    delete_prefixed(redis_url, value)


@pytest.fixture
def interop(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment (here and for worker processes) that points both apps at this test's
    keys."""
    values = interop_env(redis_url, prefix)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def conveyor_app(interop: dict[str, str]) -> Iterator[Conveyor]:
    from tests.redis.conveyor_app import make_app

    app = make_app()
    yield app
    app.close()


@pytest.fixture
def celery_client(interop: dict[str, str]) -> Iterator[Any]:
    """A Celery app of this process, to send tasks and read results as Celery does."""
    from celery import Celery
    from tests.redis.interop_settings import interop_settings

    app = Celery("interop-client", set_as_current=False)
    app.conf.update(interop_settings())
    yield app
    # Celery's close() leaves the result backend's pub/sub and pool open.
    backend = app.backend
    backend.result_consumer.stop()
    backend.client.connection_pool.disconnect()
    app.close()


class ProcessWorker:
    """A worker process (Celery's or ours) logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str) -> None:
        self.log = log
        with log.open("ab") as handle:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
            )
        self.wait_for(ready)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
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
    argv = [
        str(BIN / "celery"),
        "-A",
        "tests.redis.celery_app",
        "worker",
        "-P",
        "solo",
        "-c",
        "1",
        "-l",
        "info",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"celery-{os.getpid()}-{time.monotonic_ns()}@%h",
        *args,
    ]
    return ProcessWorker(argv, env, log, " ready.")


def start_conveyor_worker(env: dict[str, str], log: Path, *args: str) -> ProcessWorker:
    argv = [
        sys.executable,
        "-m",
        "conveyor",
        "-A",
        "tests.redis.conveyor_app",
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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test alone, on a free port, that the test may kill and
    restart. It appends every write to a file, so a restart keeps what was queued.
    ``extra`` adds server options (TLS, a Unix socket, renamed commands...)."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "no",
            *self.extra,
        ]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.wait_until_up()

    def command(self, *args: str) -> object:
        """Run one command on the server (over a plain TCP connection)."""
        import redis

        client = redis.Redis(port=self.port, protocol=2)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def wait_until_up(self, timeout: float = 10.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError((self.directory / "redis.log").read_text())
            client = redis.Redis(port=self.port, socket_connect_timeout=0.2, protocol=2, retry=None)
            try:
                if client.ping():
                    return
            except redis.AuthenticationError:
                return  # up, and wants a password
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def drop_clients(self) -> None:
        """Close every client connection, as a network blip or a proxy would."""
        import redis

        client = redis.Redis(port=self.port, protocol=2)
        try:
            for kind in ("normal", "pubsub"):
                client.client_kill_filter(_type=kind, skipme=True)
        finally:
            client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    directory = tmp_path / "private-redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    server.start()
    yield server
    server.kill()
