"""RabbitMQ figures for Conveyor, and with ``--celery`` for Celery 5 on the same server.

    .venv/bin/python bench/amqp_bench.py [--tasks 20000] [--round-trips 1000] [--celery]
                                          [--url amqp://guest:guest@127.0.0.1:5672/]

* **enqueue**: ``noop.delay()`` called ``--tasks`` times from one thread: as Conveyor
  does it (publisher confirms collected in batches; ``delay()`` doesn't wait for its own),
  then waiting for each confirm before the next call (what batching saves), then the raw
  broker's ``publish_many`` in batches of 1,000. The clock stops once RabbitMQ confirmed
  every message. (Celery publishes without confirms unless ``confirm_publish`` is set.)
* **drain**: ``--tasks`` no-op tasks are queued first; then a worker with two processes
  (``-P prefork -c 2``), and separately two single-process workers, empty the queue. The
  clock runs from the first message taken to the queue's last ready message taken (tasks
  ack early; at most the prefetch window, 8 tasks of ~0.1 ms, still runs then).
* **round trip**: ``add.delay(1, 2).get()`` one after another with a two-process worker
  running, results over ``rpc://``: median, 99th percentile and mean.

Everything happens on a vhost of its own (``conveyor-bench-<pid>``, created and deleted
with ``rabbitmqctl``, so run it where RabbitMQ runs). This file is also the worker's app
module (``conveyor -A amqp_bench worker``, ``celery -A amqp_bench:celery_app worker``).
This is a script, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
URL = os.environ.get("AMQP_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")
BATCH = 1000

# -- the apps (imported by the worker processes too) ------------------------------------------
from conveyor import Conveyor  # noqa: E402 - the constants above configure it

app = Conveyor("bench", broker=URL, backend="rpc://", result_expires=600)


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    return None


@app.task(name="bench.add")
def add(x: int, y: int) -> int:
    return x + y


def make_celery_app() -> Any:
    from celery import Celery

    celery = Celery("bench", broker=URL, backend="rpc://")
    celery.conf.update(result_expires=600, worker_hijack_root_logger=False)

    @celery.task(name="bench.noop", ignore_result=True)
    def celery_noop() -> None:
        return None

    @celery.task(name="bench.add")
    def celery_add(x: int, y: int) -> int:
        return x + y

    return celery


celery_app = make_celery_app() if os.environ.get("AMQP_BENCH_CELERY") else None


# -- the harness ------------------------------------------------------------------------------
def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=True)
    return done.stdout


@contextmanager
def private_vhost(base_url: str) -> Iterator[str]:
    vhost = f"conveyor-bench-{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    scheme, rest = base_url.split("://", 1)
    try:
        yield f"{scheme}://{rest.split('/', 1)[0]}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


class Bench:
    def __init__(self, kind: str, url: str) -> None:
        from conveyor.brokers.amqp import AmqpBroker

        self.kind = kind
        self.env = {
            **os.environ,
            "AMQP_BENCH_URL": url,
            "PYTHONPATH": str(HERE),
            "AMQP_BENCH_CELERY": "1" if kind == "celery" else "",
        }
        self.probe = AmqpBroker(url)  # counts the queue (passive declares)
        if kind == "celery":
            self.client = make_celery_app()
            self.client.conf.broker_url = url
        else:
            app.configure(broker_url=url)
            self.client = app
        self.url = url

    def ready(self) -> int:
        return self.probe.io.call(lambda conn: self.probe.topology.queue_depth("celery") or 0)

    def purge(self) -> None:
        self.probe.purge("celery")

    def send(self, name: str, *args: Any) -> Any:
        return self.client.send_task(name, args)

    def workers(self, *pools: list[str]) -> list[subprocess.Popen[bytes]]:
        processes = []
        for n, pool in enumerate(pools):
            if self.kind == "celery":
                argv = [
                    str(Path(sys.executable).parent / "celery"),
                    "-A",
                    "amqp_bench:celery_app",
                    "worker",
                    *pool,
                    "-l",
                    "warning",
                    "--without-heartbeat",
                    "--without-gossip",
                    "--without-mingle",
                ]
            else:
                argv = [
                    sys.executable,
                    "-m",
                    "conveyor",
                    "-A",
                    "amqp_bench",
                    "worker",
                    *pool,
                    "-l",
                    "warning",
                ]
            argv += ["-n", f"bench{n}-{os.getpid()}@%h"]
            processes.append(
                subprocess.Popen(
                    argv,
                    cwd=HERE,
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return processes

    @staticmethod
    def stop(processes: list[subprocess.Popen[bytes]]) -> None:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- measurements -------------------------------------------------------------------------
    def enqueue(self, count: int) -> dict[str, float]:
        self.send("bench.noop")  # connection and declarations, untimed
        self.settle()
        self.purge()
        figures = {}
        started = time.perf_counter()
        for _ in range(count):
            self.send("bench.noop")
        self.settle()
        label = "delay(), confirms batched" if self.kind == "conveyor" else "delay(), no confirms"
        figures[label] = count / (time.perf_counter() - started)
        assert self.ready() == count
        self.purge()
        if self.kind == "conveyor":
            publisher = self.client.broker.publisher
            started = time.perf_counter()
            for _ in range(count // 4):
                self.send("bench.noop")
                publisher.flush(30)
            figures["delay(), waiting for each confirm"] = (count // 4) / (
                time.perf_counter() - started
            )
            self.purge()
            items = self.envelopes(count)  # built first: the broker's part alone
            started = time.perf_counter()
            for start in range(0, count, BATCH):
                self.client.broker.publish_many(items[start : start + BATCH])
            self.settle()
            figures[f"publish_many x {BATCH:,}"] = count / (time.perf_counter() - started)
            assert self.ready() == count
            self.purge()
        return figures

    def settle(self) -> None:
        if self.kind == "conveyor":
            assert self.client.broker.publisher.flush(60)

    def envelopes(self, count: int) -> list[Any]:
        from conveyor import protocol

        build = self.client.producer.build
        return [
            (protocol.encode_task(build("bench.noop", (), {}, {})), "", "celery")
            for _ in range(count)
        ]

    def fill(self, count: int) -> None:
        if self.kind == "conveyor":
            items = self.envelopes(count)
            for start in range(0, count, BATCH):
                self.client.broker.publish_many(items[start : start + BATCH])
            self.settle()
        else:
            for _ in range(count):
                self.send("bench.noop")
        deadline = time.monotonic() + 60
        while self.ready() < count:
            assert time.monotonic() < deadline, "the queue did not fill"
            time.sleep(0.01)

    def drain(self, count: int, *pools: list[str]) -> float:
        self.purge()
        self.fill(count)
        processes = self.workers(*pools)
        try:
            deadline = time.monotonic() + 300
            while self.ready() == count:
                assert time.monotonic() < deadline, "no worker started"
                time.sleep(0.001)
            started = time.perf_counter()
            while self.ready():
                assert time.monotonic() < deadline, "not drained in time"
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
        finally:
            self.stop(processes)
        return count / elapsed

    def round_trips(self, count: int) -> dict[str, float]:
        self.purge()
        processes = self.workers(["-P", "prefork", "-c", "2"])
        try:
            assert self.send("bench.add", 1, 2).get(timeout=60) == 3  # the worker is up
            for _ in range(50):
                self.send("bench.add", 1, 2).get(timeout=10)
            times = []
            for _ in range(count):
                started = time.perf_counter()
                assert self.send("bench.add", 1, 2).get(timeout=10) == 3
                times.append(time.perf_counter() - started)
        finally:
            self.stop(processes)
        times.sort()
        return {
            "p50": times[len(times) // 2] * 1000,
            "p99": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
            "mean": statistics.fmean(times) * 1000,
        }

    def close(self) -> None:
        if self.kind == "celery":
            consumer = getattr(self.client.backend, "result_consumer", None)
            if consumer is not None and consumer._connection is not None:
                consumer.stop()
        self.client.close()
        self.probe.close()


def run(kind: str, url: str, tasks: int, trips: int) -> dict[str, Any]:
    """Every measurement of one system; one that fails is reported, not fatal."""
    bench = Bench(kind, url)
    # Celery's single-process workers run -P threads -c 1: with -P solo, Celery 5.7 on
    # RabbitMQ held acks for seconds in our runs (docs/amqp.md), which measures nothing.
    single = ["-P", "solo"] if kind == "conveyor" else ["-P", "threads", "-c", "1"]
    steps: list[tuple[str, Any]] = [
        ("enqueue", lambda: bench.enqueue(tasks)),
        ("prefork", lambda: bench.drain(tasks, ["-P", "prefork", "-c", "2"])),
        ("two", lambda: bench.drain(tasks, single, single)),
        ("latency", lambda: bench.round_trips(trips)),
    ]
    figures: dict[str, Any] = {}
    try:
        for name, measure in steps:
            print(f"{kind}: {name} ...", flush=True)
            try:
                figures[name] = measure()
            except Exception as exc:  # a failed measurement is reported; the others go on
                figures[name] = f"failed: {type(exc).__name__}: {exc}"
            print(f"  {figures[name]}", flush=True)
    finally:
        bench.close()
    return figures


def report(kind: str, figures: dict[str, Any], tasks: int, trips: int) -> str:
    lines = [{"conveyor": "Conveyor", "celery": "Celery 5.7"}[kind]]

    def rate(value: Any) -> str:
        return f"{value:10,.0f} tasks/s" if isinstance(value, float) else str(value)

    enqueue = figures.get("enqueue")
    if isinstance(enqueue, dict):
        for label, value in enqueue.items():
            lines.append(f"  enqueue, {label:<34} {rate(value)}")
    else:
        lines.append(f"  enqueue: {enqueue}")
    lines.append(f"  drain {tasks:,} no-ops, -P prefork -c 2   {rate(figures.get('prefork'))}")
    lines.append(f"  drain {tasks:,} no-ops, 2 workers x 1     {rate(figures.get('two'))}")
    latency = figures.get("latency")
    if isinstance(latency, dict):
        lines.append(
            f"  round trip ({trips:,} sequential, rpc://)   p50 {latency['p50']:.2f} ms   "
            f"p99 {latency['p99']:.2f} ms   mean {latency['mean']:.2f} ms"
        )
    else:
        lines.append(f"  round trip: {latency}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default=URL, help="the RabbitMQ (its vhost is not used)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--round-trips", type=int, default=1_000)
    parser.add_argument("--celery", action="store_true", help="measure Celery too")
    parser.add_argument("--celery-only", action="store_true", help="measure Celery alone")
    options = parser.parse_args()
    kinds = ["conveyor", "celery"] if options.celery else ["conveyor"]
    if options.celery_only:
        kinds = ["celery"]
    with private_vhost(options.url) as url:
        results = {kind: run(kind, url, options.tasks, options.round_trips) for kind in kinds}
    print()
    for kind, figures in results.items():
        print(report(kind, figures, options.tasks, options.round_trips))


if __name__ == "__main__":
    main()
