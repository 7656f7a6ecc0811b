"""Redis figures for Conveyor, and with ``--celery`` for Celery 5 on the same server.

    .venv/bin/python bench/redis_bench.py [--tasks 20000] [--round-trips 1000] [--celery]
                                           [--url redis://host:port/db]

* **enqueue**: ``noop.delay()`` called ``--tasks`` times from one thread; then the same
  number sent as groups of 1,000 (one round trip per group where the client batches).
* **drain**: ``--tasks`` no-op tasks are queued first; then a worker with two processes
  (``-P prefork -c 2``), and separately two single-process workers, empty the queue. The
  clock runs from the first message taken to the last one acknowledged.
* **round trip**: ``add.delay(1, 2).get()`` one after another with a two-process worker
  running: median, 99th percentile and mean.

Without ``--url`` a private ``redis-server`` (no persistence, no other clients) on a free
port is started and stopped. Every key lives under a prefix of its own and is deleted
afterwards, so a shared server (``--url``) is left as it was. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
GROUP = 1000


@dataclass
class System:
    name: str
    app_module: str
    worker_command: Callable[[str, list[str]], list[str]]


def conveyor_worker(hostname: str, pool: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "conveyor",
        "-A",
        "redis_bench_app",
        "worker",
        *pool,
        "-n",
        hostname,
        "-l",
        "warning",
    ]


def celery_worker(hostname: str, pool: list[str]) -> list[str]:
    return [
        str(Path(sys.executable).parent / "celery"),
        "-A",
        "redis_bench_celery",
        "worker",
        *pool,
        "-n",
        hostname,
        "-l",
        "warning",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
    ]


SYSTEMS = {
    "conveyor": System("Conveyor", "redis_bench_app", conveyor_worker),
    "celery": System("Celery", "redis_bench_celery", celery_worker),
}


@contextmanager
def private_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed; pass --url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="redis-bench-")
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


class Bench:
    def __init__(self, system: System, url: str) -> None:
        self.system = system
        self.url = url
        self.prefix = f"redis-bench-{uuid.uuid4().hex[:8]}:"
        self.env = {**os.environ, "REDIS_BENCH_URL": url, "REDIS_BENCH_PREFIX": self.prefix}
        os.environ.update(REDIS_BENCH_URL=url, REDIS_BENCH_PREFIX=self.prefix)
        sys.path.insert(0, str(HERE))
        self.module: Any = __import__(system.app_module)
        self.raw = redis.Redis.from_url(url)

    # -- helpers --------------------------------------------------------------------
    def queue_length(self) -> int:
        return int(self.raw.llen(f"{self.prefix}celery"))

    def unacked(self) -> int:
        return int(self.raw.hlen(f"{self.prefix}unacked"))

    def clean(self) -> None:
        keys = list(self.raw.scan_iter(match=f"{self.prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            self.raw.delete(*keys[start : start + 1000])

    def send_groups(self, count: int) -> None:
        if self.system.app_module == "redis_bench_app":
            from conveyor.canvas import group
        else:
            from celery import group
        for start in range(0, count, GROUP):
            group(self.module.noop.s() for _ in range(min(GROUP, count - start))).apply_async()

    @contextmanager
    def workers(self, *pools: list[str]) -> Iterator[None]:
        processes = [
            subprocess.Popen(
                self.system.worker_command(f"bench{n}-{os.getpid()}@%h", pool),
                cwd=HERE,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n, pool in enumerate(pools)
        ]
        try:
            yield
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    # -- measurements -----------------------------------------------------------------
    def enqueue(self, count: int) -> dict[str, float]:
        self.module.noop.delay()  # connections and declarations, untimed
        self.clean()
        started = time.perf_counter()
        for _ in range(count):
            self.module.noop.delay()
        single = count / (time.perf_counter() - started)
        assert self.queue_length() == count, self.queue_length()
        self.clean()
        started = time.perf_counter()
        self.send_groups(count)
        grouped = count / (time.perf_counter() - started)
        assert self.queue_length() == count, self.queue_length()
        self.clean()
        return {"single": single, "groups": grouped}

    def drain(self, count: int, *pools: list[str]) -> float:
        self.clean()
        self.send_groups(count)
        assert self.queue_length() == count
        with self.workers(*pools):
            deadline = time.monotonic() + 120
            while self.queue_length() == count:
                assert time.monotonic() < deadline, "no worker started"
                time.sleep(0.001)
            started = time.perf_counter()
            while self.queue_length() or self.unacked():
                assert time.monotonic() < deadline, "not drained in time"
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
        self.clean()
        return count / elapsed

    def round_trips(self, count: int) -> dict[str, float]:
        self.clean()
        add = self.module.add
        with self.workers(["-P", "prefork", "-c", "2"]):
            add.delay(1, 2).get(timeout=60)  # the worker is up
            for _ in range(50):
                add.delay(1, 2).get(timeout=10)
            times = []
            for _ in range(count):
                started = time.perf_counter()
                assert add.delay(1, 2).get(timeout=10) == 3
                times.append(time.perf_counter() - started)
        self.clean()
        times.sort()
        return {
            "p50": times[len(times) // 2] * 1000,
            "p99": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
            "mean": statistics.fmean(times) * 1000,
        }

    def close(self) -> None:
        self.clean()
        self.raw.close()
        app = self.module.app
        if hasattr(app, "backend") and self.system.app_module == "redis_bench_celery":
            app.backend.result_consumer.stop()
            app.backend.client.connection_pool.disconnect()
        app.close()


def run(system: System, url: str, tasks: int, trips: int) -> dict[str, Any]:
    bench = Bench(system, url)
    try:
        print(f"{system.name}: enqueue ...", flush=True)
        enqueue = bench.enqueue(tasks)
        print(f"{system.name}: drain, one worker of 2 processes ...", flush=True)
        prefork = bench.drain(tasks, ["-P", "prefork", "-c", "2"])
        print(f"{system.name}: drain, two workers of 1 process ...", flush=True)
        solo_pool = ["-P", "solo"] if system.name == "Conveyor" else ["-P", "solo", "-c", "1"]
        two = bench.drain(tasks, solo_pool, solo_pool)
        print(f"{system.name}: round trips ...", flush=True)
        latency = bench.round_trips(trips)
    finally:
        bench.close()
    return {"enqueue": enqueue, "prefork": prefork, "two": two, "latency": latency}


def report(name: str, figures: dict[str, Any], tasks: int, trips: int) -> str:
    enqueue, latency = figures["enqueue"], figures["latency"]
    return "\n".join(
        [
            f"{name}",
            f"  enqueue, single delay() calls   {enqueue['single']:10,.0f} tasks/s",
            f"  enqueue, groups of {GROUP:,}        {enqueue['groups']:10,.0f} tasks/s",
            f"  drain {tasks:,} no-ops, -P prefork -c 2   {figures['prefork']:8,.0f} tasks/s",
            f"  drain {tasks:,} no-ops, 2 workers x 1     {figures['two']:8,.0f} tasks/s",
            f"  round trip ({trips:,} sequential)   p50 {latency['p50']:.2f} ms   "
            f"p99 {latency['p99']:.2f} ms   mean {latency['mean']:.2f} ms",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a Redis to use (default: a private redis-server)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--round-trips", type=int, default=1_000)
    parser.add_argument("--celery", action="store_true", help="measure Celery too")
    options = parser.parse_args()
    names = ["conveyor", "celery"] if options.celery else ["conveyor"]
    with contextmanager(lambda: (yield options.url))() if options.url else private_redis() as url:
        results = {
            name: run(SYSTEMS[name], url, options.tasks, options.round_trips) for name in names
        }
    print()
    for name, figures in results.items():
        print(report(SYSTEMS[name].name, figures, options.tasks, options.round_trips))


if __name__ == "__main__":
    main()
