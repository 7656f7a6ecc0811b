"""The run: every (repetition, broker, system) cell, in alternation, and what each measured.

One cell, on one broker for one system:

1. a driver process (``bench.driver``) imports the system's app; queues are purged;
2. bulk enqueue: ``calls`` group calls of ``size`` no-ops into a side queue, then purged;
3. single enqueue: ``n`` ``noop.delay()`` calls into the main queue (after one warm-up);
4. drain: the worker command starts; start-up is the time to the first INCR, the drain
   ends at the last one; the worker tree's RSS is sampled all along;
5. round trip: ``add.delay(1, 2).get()`` sequentially, on that worker, now idle; then
   the worker stops;
6. late-ack drain: ``n`` more no-ops, acknowledged after they run (``noop_late``; for
   Dramatiq, whose only mode that is, ``noop`` again), drained by the same command;
7. I/O: ``io10`` tasks queued, then a worker with each system's best I/O setting.

A failure anywhere is recorded against the metrics it prevents, as text, and the run
goes on with the next cell.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue as queue_module
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.measure import BenchError, Counter, Drained, WorkerProcess, drain, percentile
from bench.settings import (
    AMQP_HOST,
    AMQP_PORT,
    BENCH_REDIS_URL,
    ENV_BACKEND_URL,
    ENV_BROKER,
    ENV_BROKER_URL,
    ENV_BULK_QUEUE,
    ENV_COUNTER_KEY,
    ENV_COUNTER_URL,
    ENV_IO_QUEUE,
    ENV_QUEUE,
    REDIS_HOST,
    REDIS_PORT,
)
from bench.systems.setups import (
    SUPPORTED,
    drain_command,
    io_command,
    setup_for,
)

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "redis-py"  # the bare client, measured on the Redis row


def task_message_bytes() -> int:
    """The size of one ``noop`` message as Conveyor's Redis broker stores it: the bare
    client pushes values of this size, so both write the same number of bytes."""
    from conveyor import Conveyor
    from conveyor.brokers.redis_layout import encode_envelope
    from conveyor.brokers.redis_routing import new_delivery_tag

    app = Conveyor("bench", broker="memory://bench-message-size", backend=None)
    try:
        producer = app.producer
        name = "bench.systems.conveyor_app.noop"
        plan = producer.plan(name, {})
        assert plan is not None  # a plain call: no eta, JSON, no compression
        envelope, target = producer.plain(plan, name, (), {}, {})
        text = encode_envelope(envelope, target.exchange, target.routing_key,
                               new_delivery_tag())
    finally:
        app.close()
    return len(text.encode())


@dataclass(frozen=True)
class Profile:
    """How much each measurement does."""

    name: str
    drain_n: int  # tasks queued (one call each: the single-enqueue figure) and drained
    bulk_calls: int
    bulk_size: int
    round_trips: int
    round_trip_warmup: int
    io_n: int
    reps: int
    chart: bool = True


PROFILES = {
    "full": Profile("full", drain_n=20_000, bulk_calls=20, bulk_size=1_000,
                    round_trips=300, round_trip_warmup=20, io_n=5_000, reps=3),
    "quick": Profile("quick", drain_n=4_000, bulk_calls=4, bulk_size=1_000,
                     round_trips=100, round_trip_warmup=10, io_n=2_000, reps=1),
    # The CI smoke run: every code path, tiny numbers, nothing written but a temp file.
    # io_n is a few times the I/O concurrency (100): with fewer, every task can end within
    # one 2 ms poll of the counter, and the rate reads "inf".
    "smoke": Profile("smoke", drain_n=50, bulk_calls=2, bulk_size=25, round_trips=10,
                     round_trip_warmup=2, io_n=300, reps=1, chart=False),
}

METRICS = ("enqueue_single", "enqueue_bulk", "startup", "drain_total", "drain",
           "drain_late", "rt_p50", "rt_p99", "io", "rss")
DRAIN_METRICS = ("startup", "drain_total", "drain", "rss")


@dataclass
class Results:
    """Samples per (broker, system, metric), one per repetition that measured it."""

    samples: dict[tuple[str, str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list))
    errors: dict[tuple[str, str, str], str] = field(default_factory=dict)
    attempted: list[tuple[str, str]] = field(default_factory=list)
    rep: int = 1  # the repetition under way, named in error texts

    def add(self, broker: str, system: str, metric: str, value: float) -> None:
        self.samples[(broker, system, metric)].append(value)

    def fail(self, broker: str, system: str, metrics: tuple[str, ...] | str,
             error: str) -> None:
        for metric in (metrics,) if isinstance(metrics, str) else metrics:
            self.errors[(broker, system, metric)] = f"rep {self.rep}: {error}"

    def attempt(self, broker: str, system: str) -> None:
        if (broker, system) not in self.attempted:
            self.attempted.append((broker, system))


# -- the driver process -----------------------------------------------------------------------

class DriverProcess:
    """``python -m bench.driver SYSTEM``, spoken to one JSON line at a time."""

    def __init__(self, system: str, env: dict[str, str], log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.driver", system], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True)
        self._answers: queue_module.Queue[str | None] = queue_module.Queue()
        threading.Thread(target=self._read, daemon=True, name="driver-reader").start()
        self._expect(60.0, "start")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._answers.put(line.decode())
        self._answers.put(None)

    def _expect(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._answers.get(timeout=timeout)
        except queue_module.Empty:
            self.kill()
            raise BenchError(f"driver: no answer to {what} after {timeout:.0f}s") from None
        if line is None:
            raise BenchError(f"driver exited during {what} (code {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error", "unknown error")))
        return answer

    def call(self, op: str, timeout: float, **arguments: Any) -> dict[str, Any]:
        if self.process.poll() is not None:
            raise BenchError(f"driver is gone (code {self.process.returncode})")
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": op, **arguments}) + "\n").encode())
        self.process.stdin.flush()
        return self._expect(timeout, op)

    def close(self) -> None:
        if self.process.poll() is None:
            # quit lets the driver close its connections (and flush unconfirmed publishes).
            with contextlib.suppress(BenchError, OSError):
                self.call("quit", timeout=20.0)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        self.process.wait()


# -- one cell ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Names:
    """Queue and key names of one cell: unique per run, repetition and system, so no
    leftover of another cell (or of a concurrent run) can be counted."""

    queue: str
    bulk: str
    io: str
    counter_key: str

    @classmethod
    def for_cell(cls, run_id: str, rep: int, system: str) -> Names:
        base = f"bench{run_id}r{rep}_{system}"
        return cls(base, f"{base}_bulk", f"{base}_io", f"bench:{run_id}:r{rep}:{system}:count")


def cell_env(system: str, broker: str, names: Names, workdir: Path, rep: int) -> dict[str, str]:
    setup = setup_for(system, broker, workdir / f"{system}-r{rep}.db")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONVEYOR_")}
    env.update({
        ENV_BROKER: broker,
        ENV_BROKER_URL: setup.broker_url,
        ENV_BACKEND_URL: setup.backend_url,
        ENV_QUEUE: names.queue,
        ENV_BULK_QUEUE: names.bulk,
        ENV_IO_QUEUE: names.io,
        ENV_COUNTER_URL: BENCH_REDIS_URL,
        ENV_COUNTER_KEY: names.counter_key,
        # The workers import bench.systems.* from the repository, as `-A proj` would
        # import a user's module from the directory they start it in.
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def enqueue_timeout(n: int) -> float:
    return 60.0 + n / 100.0


def drain_timeout(n: int) -> float:
    return 60.0 + n / 50.0


def run_cell(results: Results, profile: Profile, broker: str, system: str, rep: int,
             run_id: str, workdir: Path, log: Any) -> None:
    names = Names.for_cell(run_id, rep, system)
    env = cell_env(system, broker, names, workdir, rep)
    counter = Counter(BENCH_REDIS_URL, names.counter_key)
    prefix = workdir / f"{broker}-{system}-r{rep}"
    results.attempt(broker, system)
    try:
        driver = DriverProcess(system, env, prefix.with_suffix(".driver.log"))
    except BenchError as exc:
        results.fail(broker, system, METRICS, f"driver: {exc}")
        return
    try:
        for name in (names.queue, names.bulk, names.io):
            driver.call("purge", timeout=60.0, queue=name)
        _bulk(results, profile, broker, system, driver, names, log)
        _drain_and_round_trip(results, profile, broker, system, driver, names, env,
                              counter, prefix, log)
        _drain_late(results, profile, broker, system, driver, names, env, counter, prefix,
                    log)
        _io(results, profile, broker, system, driver, names, env, counter, prefix, log)
    except BenchError as exc:
        # Only a purge can get here (the phases record their own errors).
        for metric in METRICS:
            if not results.samples.get((broker, system, metric)):
                results.fail(broker, system, metric, str(exc))
    finally:
        for name in (names.queue, names.bulk, names.io):
            with contextlib.suppress(BenchError):
                driver.call("purge", timeout=60.0, queue=name)
        driver.close()
        with contextlib.suppress(Exception):
            counter.reset()


def _bulk(results: Results, profile: Profile, broker: str, system: str,
          driver: DriverProcess, names: Names, log: Any) -> None:
    total = profile.bulk_calls * profile.bulk_size
    try:
        answer = driver.call("bulk", timeout=enqueue_timeout(total), calls=profile.bulk_calls,
                             size=profile.bulk_size, queue=names.bulk)
        rate = answer["sent"] / answer["seconds"]
        results.add(broker, system, "enqueue_bulk", rate)
        log(f"    bulk enqueue   {rate:>10,.0f} tasks/s")
    except BenchError as exc:
        results.fail(broker, system, "enqueue_bulk", str(exc))
        log(f"    bulk enqueue   failed: {exc}")
    finally:
        with contextlib.suppress(BenchError):
            driver.call("purge", timeout=60.0, queue=names.bulk)


def _drain_and_round_trip(results: Results, profile: Profile, broker: str, system: str,
                          driver: DriverProcess, names: Names, env: dict[str, str],
                          counter: Counter, prefix: Path, log: Any) -> None:
    counter.reset()
    try:
        answer = driver.call("enqueue", timeout=enqueue_timeout(profile.drain_n),
                             n=profile.drain_n)
    except BenchError as exc:
        results.fail(broker, system, ("enqueue_single", *DRAIN_METRICS, "rt_p50", "rt_p99"),
                     str(exc))
        log(f"    enqueue        failed: {exc}")
        return
    rate = profile.drain_n / answer["seconds"]
    results.add(broker, system, "enqueue_single", rate)
    log(f"    single enqueue {rate:>10,.0f} tasks/s")
    worker = WorkerProcess(drain_command(system, names.queue), env, ROOT,
                           prefix.with_suffix(".worker.log"))
    try:
        try:
            drained = drain(worker, counter, int(answer["sent"]),
                            drain_timeout(profile.drain_n))
        except (BenchError, OSError) as exc:
            results.fail(broker, system, (*DRAIN_METRICS, "rt_p50", "rt_p99"),
                         f"drain: {exc}")
            log(f"    drain          failed: {exc}")
            return
        results.add(broker, system, "startup", drained.startup)
        results.add(broker, system, "drain_total", drained.rate_with_startup)
        results.add(broker, system, "drain", drained.rate_without_startup)
        results.add(broker, system, "rss", drained.peak_rss / 2**20)
        log(f"    drain          {drained.rate_without_startup:>10,.0f} tasks/s "
            f"(start-up {drained.startup:.2f}s, {drained.rate_with_startup:,.0f}/s with it, "
            f"peak RSS {drained.peak_rss / 2**20:,.0f} MiB)")
        try:
            answer = driver.call("round_trip", timeout=60.0 + profile.round_trips,
                                 n=profile.round_trips, warmup=profile.round_trip_warmup)
        except BenchError as exc:
            results.fail(broker, system, ("rt_p50", "rt_p99"), f"round trip: {exc}")
            log(f"    round trip     failed: {exc}")
            return
        latencies = [seconds * 1000 for seconds in answer["latencies"]]
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        results.add(broker, system, "rt_p50", p50)
        results.add(broker, system, "rt_p99", p99)
        log(f"    round trip     p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    finally:
        worker.stop()


def _drain_with(command: list[str], env: dict[str, str], log_path: Path, counter: Counter,
                sent: int, timeout: float) -> Drained:
    """Start the worker command, time it draining ``sent`` tasks, stop it."""
    worker = WorkerProcess(command, env, ROOT, log_path)
    try:
        return drain(worker, counter, sent, timeout)
    finally:
        worker.stop()


def _drain_late(results: Results, profile: Profile, broker: str, system: str,
                driver: DriverProcess, names: Names, env: dict[str, str], counter: Counter,
                prefix: Path, log: Any) -> None:
    """The drain again, of tasks acknowledged after they run: as many, the same command."""
    counter.reset()
    try:
        # Whatever a failed first drain left would be counted here.
        driver.call("purge", timeout=60.0, queue=names.queue)
        # Timed by the driver like any enqueue, but not a figure: the enqueue column is
        # the first drain's.
        answer = driver.call("enqueue", timeout=enqueue_timeout(profile.drain_n),
                             n=profile.drain_n, late=True)
    except BenchError as exc:
        results.fail(broker, system, "drain_late", f"queueing: {exc}")
        log(f"    drain late-ack failed: {exc}")
        return
    try:
        drained = _drain_with(drain_command(system, names.queue), env,
                              prefix.with_suffix(".late.log"), counter, int(answer["sent"]),
                              drain_timeout(profile.drain_n))
    except (BenchError, OSError) as exc:
        results.fail(broker, system, "drain_late", f"drain: {exc}")
        log(f"    drain late-ack failed: {exc}")
        return
    results.add(broker, system, "drain_late", drained.rate_without_startup)
    log(f"    drain late-ack {drained.rate_without_startup:>10,.0f} tasks/s "
        f"(start-up {drained.startup:.2f}s, {drained.rate_with_startup:,.0f}/s with it)")


def _io(results: Results, profile: Profile, broker: str, system: str,
        driver: DriverProcess, names: Names, env: dict[str, str], counter: Counter,
        prefix: Path, log: Any) -> None:
    counter.reset()
    try:
        answer = driver.call("enqueue_io", timeout=enqueue_timeout(profile.io_n),
                             n=profile.io_n)
    except BenchError as exc:
        results.fail(broker, system, "io", f"enqueue: {exc}")
        log(f"    I/O            failed: {exc}")
        return
    try:
        drained = _drain_with(io_command(system, names.io), env, prefix.with_suffix(".io.log"),
                              counter, int(answer["sent"]), drain_timeout(profile.io_n))
    except (BenchError, OSError) as exc:
        results.fail(broker, system, "io", str(exc))
        log(f"    I/O            failed: {exc}")
        return
    results.add(broker, system, "io", drained.rate_without_startup)
    log(f"    I/O 10 ms      {drained.rate_without_startup:>10,.0f} tasks/s "
        f"(start-up {drained.startup:.2f}s)")


# -- the bare client baseline -------------------------------------------------------------------

def run_baseline(results: Results, profile: Profile, run_id: str, log: Any) -> None:
    """redis-py alone: one LPUSH per call, then pipelined LPUSHes in batches."""
    import redis

    results.attempt("redis", BASELINE)
    key = f"bench:{run_id}:baseline"
    payload = b"x" * task_message_bytes()
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    try:
        client.lpush(key, payload)  # warm-up: the connection
        started = time.perf_counter()
        for _ in range(profile.drain_n):
            client.lpush(key, payload)
        single = profile.drain_n / (time.perf_counter() - started)
        client.delete(key)
        started = time.perf_counter()
        for _ in range(profile.bulk_calls):
            pipe = client.pipeline(transaction=False)
            for _ in range(profile.bulk_size):
                pipe.lpush(key, payload)
            pipe.execute()
        bulk = profile.bulk_calls * profile.bulk_size / (time.perf_counter() - started)
        results.add("redis", BASELINE, "enqueue_single", single)
        results.add("redis", BASELINE, "enqueue_bulk", bulk)
        log(f"    single LPUSH   {single:>10,.0f} /s; pipelined {bulk:,.0f} /s")
    except redis.RedisError as exc:
        results.fail("redis", BASELINE, ("enqueue_single", "enqueue_bulk"), str(exc))
    finally:
        with contextlib.suppress(redis.RedisError):
            client.delete(key)
        client.close()


# -- services and clean-up ----------------------------------------------------------------------

def service_up(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def cleanup(run_id: str, queue_names: list[str]) -> None:
    """Remove what the run left in Redis db 14 and RabbitMQ (queues are per run)."""
    import redis

    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(BENCH_REDIS_URL)
        keys = list(client.scan_iter(match=f"*bench{run_id}*", count=1000))
        keys += list(client.scan_iter(match=f"bench:{run_id}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        client.close()
    if service_up(AMQP_HOST, AMQP_PORT):
        _delete_amqp_queues(queue_names)


def _delete_amqp_queues(names: list[str]) -> None:
    import pika
    import pika.exceptions

    # Dramatiq adds .DQ (delayed) and .XQ (dead) queues; Conveyor dead-letters into
    # conveyor.dead.<queue>.
    candidates = [variant for name in names
                  for variant in (name, f"{name}.DQ", f"{name}.XQ", f"conveyor.dead.{name}")]
    try:
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            host=AMQP_HOST, port=AMQP_PORT, credentials=pika.PlainCredentials("guest", "guest")))
    except pika.exceptions.AMQPError:
        return
    try:
        channel = connection.channel()
        for name in candidates:
            try:
                channel.queue_delete(name)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()  # 404: never declared
    except pika.exceptions.AMQPError:
        pass
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


# -- the whole run ------------------------------------------------------------------------------

@dataclass
class Run:
    profile: Profile
    brokers: list[str]
    systems: list[str]
    results: Results
    started: float
    finished: float
    run_id: str
    skipped: dict[str, str]
    load: list[float] = field(default_factory=list)  # 1-minute load average, start and end
    commit: str = ""  # the Conveyor source measured

    def to_json(self) -> dict[str, Any]:
        """Every sample, so tables and chart can be drawn again (``--render``)."""
        results = self.results
        return {
            "profile": asdict(self.profile), "brokers": self.brokers, "systems": self.systems,
            "started": self.started, "finished": self.finished, "run_id": self.run_id,
            "skipped": self.skipped, "load": self.load, "commit": self.commit,
            "attempted": results.attempted,
            "samples": [[*key, values] for key, values in results.samples.items()],
            "errors": [[*key, error] for key, error in results.errors.items()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        results = Results()
        results.attempted = [(broker, system) for broker, system in data["attempted"]]
        for broker, system, metric, values in data["samples"]:
            results.samples[(broker, system, metric)] = list(values)
        for broker, system, metric, error in data["errors"]:
            results.errors[(broker, system, metric)] = error
        return cls(Profile(**data["profile"]), data["brokers"], data["systems"], results,
                   data["started"], data["finished"], data["run_id"], data["skipped"],
                   data.get("load", []), data.get("commit", ""))


def run(profile: Profile, brokers: list[str], systems: list[str], log: Any) -> Run:
    run_id = secrets.token_hex(3)
    results = Results()
    skipped: dict[str, str] = {}
    live: list[str] = []
    for broker in brokers:
        reason = broker_missing(broker)
        if reason:
            skipped[broker] = reason
            log(f"skipping {broker}: {reason}")
        else:
            live.append(broker)
    if not service_up(REDIS_HOST, REDIS_PORT):
        raise SystemExit("Redis must run on 127.0.0.1:6379: every task counts itself there")
    from bench.report import git_commit

    started = time.time()
    load_at_start = os.getloadavg()[0]
    commit = git_commit()
    queue_names: list[str] = []
    # SQLite databases and every worker's and driver's log; kept only if something failed.
    workdir = Path(tempfile.mkdtemp(prefix=f"conveyor-bench-{run_id}-"))
    try:
        for rep in range(1, profile.reps + 1):
            results.rep = rep
            for broker in live:
                if broker == "redis":
                    log(f"[rep {rep}/{profile.reps}] {broker} / {BASELINE} (bare client)")
                    run_baseline(results, profile, run_id, log)
                for system in systems:
                    if broker not in SUPPORTED[system]:
                        continue
                    names = Names.for_cell(run_id, rep, system)
                    queue_names += [names.queue, names.bulk, names.io]
                    log(f"[rep {rep}/{profile.reps}] {broker} / {system}")
                    run_cell(results, profile, broker, system, rep, run_id, workdir, log)
    finally:
        cleanup(run_id, queue_names)
        if results.errors:
            log(f"logs of every worker and driver kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return Run(profile, live, systems, results, started, time.time(), run_id, skipped,
               [load_at_start, os.getloadavg()[0]], commit)


def broker_missing(broker: str) -> str | None:
    if broker == "redis" and not service_up(REDIS_HOST, REDIS_PORT):
        return f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}"
    if broker == "amqp" and not service_up(AMQP_HOST, AMQP_PORT):
        return f"RabbitMQ is not reachable on {AMQP_HOST}:{AMQP_PORT}"
    return None


def with_reps(profile: Profile, reps: int | None) -> Profile:
    return profile if reps is None else replace(profile, reps=reps)
