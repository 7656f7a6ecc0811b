"""Idle processes of one prefork worker take turns listening to Redis, so one push wakes
one process instead of all of them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.redis.conftest import PrivateRedis, ProcessWorker, start_conveyor_worker
from tests.redis.conveyor_app import make_app
from tests.redis.monitoring import monitored
from tests.redis.scratch import ScratchRedisBroker

import redis
from conveyor import Conveyor
from conveyor.brokers.idle_gate import IdleGate, create_gate_directory, remove_gate_directory
from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis_wakeup import FETCHES_BEFORE_QUIET, KEEP_WATCH
from conveyor.envelope import Delivery, Envelope

PATIENCE = 10.0


@pytest.fixture
def gate_directory() -> Iterator[str]:
    made = create_gate_directory()
    yield made
    remove_gate_directory(made)


@pytest.fixture
def connect(redis_url: str, prefix: str) -> Iterator[Callable[[], RedisBroker]]:
    opened: list[RedisBroker] = []

    def open_broker() -> RedisBroker:
        broker = ScratchRedisBroker(redis_url, global_keyprefix=prefix)
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


def envelope(body: str) -> Envelope:
    return Envelope(body.encode(), "application/json", "utf-8", {"task": "t"}, {"priority": 0})


def counting_takes(broker: RedisBroker) -> list[int]:
    """Count the broker's fetch scripts (each look at the queues is one)."""
    calls = [0]
    take = broker._take

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return take(*args)

    broker._take = counted  # type: ignore[method-assign]
    return calls


def test_a_process_waiting_at_the_gate_is_not_woken_by_a_push(
    connect: Callable[[], RedisBroker], gate_directory: str
) -> None:
    sibling = IdleGate(gate_directory)  # another process of the worker, listening
    assert sibling.acquire(0)
    broker = connect()
    broker.share_idle_wait(IdleGate(gate_directory))
    takes = counting_takes(broker)
    got: list[list[Delivery]] = []
    fetching = threading.Thread(target=lambda: got.append(broker.fetch(["q"], 10, PATIENCE)))
    fetching.start()
    time.sleep(0.3)
    connect().publish(envelope("m"), exchange="", routing_key="q")
    time.sleep(0.5)
    assert fetching.is_alive()  # the push was the listening sibling's to take
    assert takes == [1]  # the look before queueing at the gate, and none since
    sibling.release()  # the sibling leaves busy: this one listens now, and looks first
    fetching.join(PATIENCE)
    assert [d.envelope.body for batch in got for d in batch] == [b"m"]
    assert takes == [2]
    sibling.close()


def test_a_wake_left_over_from_before_the_fetch_does_not_make_it_spin(
    connect: Callable[[], RedisBroker], gate_directory: str
) -> None:
    sibling = IdleGate(gate_directory)
    assert sibling.acquire(0)
    broker = connect()
    broker.share_idle_wait(IdleGate(gate_directory))
    broker.wake()  # ends the next fetch, and leaves its ring in the pipe
    assert broker.fetch(["q"], 10, 1.0) == []
    takes = counting_takes(broker)
    began = time.monotonic()
    assert broker.fetch(["q"], 10, 1.0) == []
    assert time.monotonic() - began >= 0.9  # it waited its time at the gate
    assert takes[0] <= 3  # without a look per loop for the whole second
    sibling.close()


def listening_holder(
    connect: Callable[[], RedisBroker], gate_directory: str, window: int = 10
) -> tuple[RedisBroker, RedisBroker]:
    """A broker that went idle with a window of ``window`` messages, so it listens
    holding the gate, and a producer."""
    broker, producer = connect(), connect()
    broker.share_idle_wait(IdleGate(gate_directory))
    assert broker.fetch(["q"], window, 0.2) == []
    return broker, producer


def test_change_reports_stay_on_after_a_fetch_that_empties_the_queue_and_stop_otherwise(
    connect: Callable[[], RedisBroker], gate_directory: str
) -> None:
    broker, producer = listening_holder(connect, gate_directory)
    waiter = broker._waiter
    assert waiter.listener.tracking
    assert waiter.gate is not None
    assert waiter.gate.held
    producer.publish(envelope("one"), exchange="", routing_key="q")
    partial = broker.fetch(["q"], 10, PATIENCE)
    assert len(partial) == 1
    assert waiter.listener.tracking  # the next sleep is near: no round trip to resume
    assert waiter.gate.held  # the queue is empty, and this one looks again after its jobs
    broker.hand_over_idle_wait()  # unless they take long
    assert not waiter.gate.held
    for n in range(4):
        producer.publish(envelope(str(n)), exchange="", routing_key="q")
    full = broker.fetch(["q"], 3, PATIENCE)
    assert len(full) == 3
    assert not waiter.listener.tracking  # busy: no report per push until idle again
    rest = broker.fetch(["q"], 3, PATIENCE)
    assert len(rest) == 1
    broker.ack_many([*partial, *full, *rest])
    assert broker.fetch(["q"], 10, 0.2) == []  # idle again: reports back on
    assert waiter.listener.tracking
    # Partial batches that never leave the fetch idle: nobody would read the reports.
    for n in range(FETCHES_BEFORE_QUIET + 1):
        producer.publish(envelope(str(n)), exchange="", routing_key="q")
        assert waiter.listener.tracking
        broker.ack_many(broker.fetch(["q"], 10, PATIENCE))
    assert not waiter.listener.tracking


def test_a_fetch_that_empties_the_queue_keeps_the_gate_until_it_hands_it_over(
    connect: Callable[[], RedisBroker], gate_directory: str
) -> None:
    broker, producer = listening_holder(connect, gate_directory)
    producer.publish(envelope("first"), exchange="", routing_key="q")
    began = time.monotonic()
    assert len(broker.fetch(["q"], 10, PATIENCE)) == 1  # a partial batch: the queue is empty
    ended = time.monotonic()
    kept_until = broker.idle_wait_kept_until()
    assert kept_until is not None
    assert began + KEEP_WATCH <= kept_until <= ended + KEEP_WATCH  # from the fetch's end

    sibling = connect()
    sibling.share_idle_wait(IdleGate(gate_directory))
    got: list[list[Delivery]] = []
    fetching = threading.Thread(target=lambda: got.append(sibling.fetch(["q"], 10, PATIENCE)))
    fetching.start()
    time.sleep(0.3)
    producer.publish(envelope("second"), exchange="", routing_key="q")
    time.sleep(0.5)
    assert fetching.is_alive()  # the sibling waits at the gate this process kept
    broker.hand_over_idle_wait()  # its job runs long
    assert broker.idle_wait_kept_until() is None
    fetching.join(PATIENCE)
    assert [d.envelope.body for batch in got for d in batch] == [b"second"]


def test_a_batch_that_leaves_messages_behind_lets_the_gate_go_at_once(
    connect: Callable[[], RedisBroker], gate_directory: str
) -> None:
    broker, producer = listening_holder(connect, gate_directory)
    producer.publish_many([(envelope(str(n)), "", "q") for n in range(4)])
    assert len(broker.fetch(["q"], 3, PATIENCE)) == 3  # one waits: a sibling should take it
    assert broker.idle_wait_kept_until() is None
    sibling = IdleGate(gate_directory)
    assert sibling.acquire(0)
    sibling.close()


def test_a_full_batch_that_empties_the_queue_keeps_the_gate_and_the_reports(
    connect: Callable[[], RedisBroker], gate_directory: str
) -> None:
    # A window of one message (a prefetch multiplier of 1): every batch is full, and the
    # script says whether the queue is empty.
    broker, producer = listening_holder(connect, gate_directory, window=1)
    producer.publish(envelope("only"), exchange="", routing_key="q")
    assert len(broker.fetch(["q"], 1, PATIENCE)) == 1
    assert broker.idle_wait_kept_until() is not None
    assert broker._waiter.listener.tracking
    broker.hand_over_idle_wait()


def fetch_scripts_run(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def prefork_worker_and_app(private_redis: PrivateRedis, tmp_path: Path,
                           processes: list[ProcessWorker],
                           *args: str) -> tuple[ProcessWorker, Conveyor]:
    """A prefork worker of the interop app on the private Redis, and a client app."""
    env = {**os.environ, "INTEROP_REDIS_URL": private_redis.url, "INTEROP_PREFIX": "gate:"}
    worker = start_conveyor_worker(env, tmp_path / "w.log", "-P", "prefork", *args)
    processes.append(worker)
    app = make_app(
        broker_url=private_redis.url,
        result_backend=private_redis.url,
        broker_transport_options={"global_keyprefix": "gate:"},
        result_backend_transport_options={"global_keyprefix": "gate:"},
    )
    return worker, app


def test_a_long_job_on_a_prefork_worker_lets_a_sibling_take_the_next_message(
    private_redis: PrivateRedis, tmp_path: Path, processes: list[ProcessWorker]
) -> None:
    # A window of four: a fetch of one message is a partial batch, the queue empty.
    worker, app = prefork_worker_and_app(private_redis, tmp_path, processes, "-c", "2",
                                         "--prefetch-multiplier", "4")
    try:
        sleep, add = app.tasks["interop.sleep"], app.tasks["interop.add"]
        for _ in range(3):  # both processes up and idle
            assert add.delay(1, 2).get(timeout=PATIENCE) == 3
        time.sleep(0.5)
        long_job = sleep.delay(3.0)
        time.sleep(0.5)  # it runs, in the process that kept the gate when it took it
        # The sibling takes each of these at once: the process running the long job
        # handed the watch over a moment after the job began. Otherwise the sibling
        # would find each only at its next look, which it takes once a second (a fetch
        # that times out at the gate).
        waits = []
        for n in range(4):
            began = time.monotonic()
            assert add.delay(n, 2).get(timeout=PATIENCE) == n + 2
            waits.append(time.monotonic() - began)
        assert max(waits) < 0.25, waits
        assert not long_job.ready()
        assert long_job.get(timeout=PATIENCE) == 3.0
    finally:
        app.close()
    assert worker.stop() == 0


def test_one_round_trip_on_an_idle_four_process_worker_wakes_one_process(
    private_redis: PrivateRedis, tmp_path: Path, processes: list[ProcessWorker]
) -> None:
    worker, app = prefork_worker_and_app(private_redis, tmp_path, processes, "-c", "4")
    client = redis.Redis.from_url(private_redis.url)
    try:
        add = app.tasks["interop.add"]
        for _ in range(5):  # every process up and idle
            assert add.delay(1, 2).get(timeout=PATIENCE) == 3
        time.sleep(1.0)
        before = fetch_scripts_run(client)
        rounds = 40
        for n in range(rounds):
            assert add.delay(n, 1).get(timeout=PATIENCE) == n + 1
        per_round = (fetch_scripts_run(client) - before) / rounds
        # Scripts per round trip: the fetch that takes the task, its ack, the result's
        # store, the next look of the process that ran it and one sibling's: about six.
        # With all four listening, each push and each pop wakes them all: ten or more.
        assert per_round < 8, per_round
    finally:
        client.close()
        app.close()
    assert worker.stop() == 0


def script_sequence(url: str, during: Callable[[], None]) -> list[str]:
    """What ran while ``during`` ran, in order: ``push`` for an LPUSH, ``FETCH`` and
    ``ACK`` for the broker's scripts, ``script`` for any other (a result's store)."""
    with monitored(url, PATIENCE) as seen:
        during()
    names = {"LPUSH": "push", "FETCH": "FETCH", "ACK": "ACK", "script": "script"}
    return [names[what] for _, what in seen if what in names]


def fetches_while_a_task_ran(sequence: list[str]) -> int:
    """Fetch scripts between the fetch that took a pushed task and the store of its
    result: only a fetch sent ahead runs then (a one-process worker looks again only
    after its task). Counting these, not all fetches, keeps the extra looks an idle
    process makes on a loaded machine out of the count."""
    count, running, taken = 0, False, False
    for what in sequence:
        if what == "push":
            running, taken = True, False
        elif what == "FETCH" and running:
            if taken:
                count += 1
            taken = True
        elif what == "script":
            running = False
    return count


def test_a_worker_with_no_backlog_sends_no_fetch_ahead(
    private_redis: PrivateRedis, tmp_path: Path, processes: list[ProcessWorker]
) -> None:
    # One task at a time: a fetch sent ahead as it starts would find nothing, and cost
    # the round trip a script of its own.
    worker, app = prefork_worker_and_app(private_redis, tmp_path, processes, "-c", "1",
                                         "--prefetch-multiplier", "4")
    rounds = 20
    try:
        add = app.tasks["interop.add"]
        assert add.delay(1, 2).get(timeout=PATIENCE) == 3
        time.sleep(0.5)

        def round_trips() -> None:
            for n in range(rounds):
                assert add.delay(n, 1).get(timeout=PATIENCE) == n + 1
            time.sleep(0.2)  # the process's look after the last one

        sequence = script_sequence(private_redis.url, round_trips)
    finally:
        app.close()
    assert worker.stop() == 0
    assert sequence.count("push") == rounds, sequence
    assert sequence.count("script") >= rounds, sequence  # each result's store
    assert fetches_while_a_task_ran(sequence) == 0, sequence


def test_a_look_says_whether_any_queue_or_priority_step_holds_more(
    connect: Callable[[], RedisBroker],
) -> None:
    broker, producer = connect(), connect()
    urgent = Envelope(b"u", "application/json", "utf-8", {"task": "t"}, {"priority": 9})
    producer.publish(envelope("first"), exchange="", routing_key="q1")
    producer.publish(urgent, exchange="", routing_key="q2")
    taken, _, more = broker._take(["q1", "q2"], 1)
    assert len(taken) == 1
    assert more
    taken, _, more = broker._take(["q1", "q2"], 1)
    assert len(taken) == 1
    assert not more
    taken, _, more = broker._take(["q1", "q2"], 1)
    assert (taken, more) == ([], False)
