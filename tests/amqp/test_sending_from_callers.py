"""A thread that queues a publish or an ack sends it itself while the I/O thread waits
for the socket, and leaves it to the I/O thread when that fails."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from conveyor.brokers.amqp import AmqpBroker
from conveyor.brokers.base import QueueStats
from conveyor.envelope import Delivery, Envelope
from conveyor.routing import Queue

PATIENCE = 5.0
ROUNDS = 20
IDLE = 0.01
"""A pause before each send, so the I/O thread is back to waiting in select()."""


def envelope(body: str) -> Envelope:
    return Envelope(body.encode(), "application/json", "utf-8", {}, {})


def watch_writes(broker: AmqpBroker, before: Callable[[], None] | None = None) -> list[str]:
    """The names of the threads that write to the broker's socket, in order; ``before``
    runs ahead of every write the test's thread makes."""
    writers: list[str] = []
    caller = threading.current_thread()

    def install(conn: Any) -> None:
        transport = conn.transport
        write = transport._write

        def watched(data: Any) -> Any:
            writers.append(threading.current_thread().name)
            if before is not None and threading.current_thread() is caller:
                before()
            return write(data)

        transport._write = watched

    broker.io.call(install)
    return writers


def fetch_all(broker: AmqpBroker, queue: str, count: int) -> list[Delivery]:
    deliveries: list[Delivery] = []
    deadline = time.monotonic() + PATIENCE
    while len(deliveries) < count and time.monotonic() < deadline:
        deliveries += broker.fetch([queue], count - len(deliveries), timeout=PATIENCE)
    return deliveries


def test_a_publish_is_written_by_the_thread_that_makes_it(connect: Any) -> None:
    broker = connect()
    broker.declare_queue(Queue("q"))
    writers = watch_writes(broker)
    for round_ in range(ROUNDS):
        time.sleep(IDLE)
        broker.publish(envelope(f"m{round_}"), exchange="", routing_key="q")
    assert broker.publisher.flush(PATIENCE)
    # A send may still find the I/O thread busy (a heartbeat, a confirm being read) and
    # wake it instead: most, not all, go out from here.
    assert writers.count(threading.current_thread().name) >= ROUNDS * 3 // 4, writers
    other = connect()
    received = fetch_all(other, "q", ROUNDS)
    assert sorted(d.envelope.body.decode() for d in received) == sorted(
        f"m{round_}" for round_ in range(ROUNDS))


def test_an_ack_is_written_by_the_thread_that_settles(connect: Any) -> None:
    publisher, consumer = connect(), connect()
    publisher.declare_queue(Queue("q"))
    for round_ in range(ROUNDS):
        publisher.publish(envelope(f"m{round_}"), exchange="", routing_key="q")
    deliveries = fetch_all(consumer, "q", ROUNDS)
    assert len(deliveries) == ROUNDS
    writers = watch_writes(consumer)
    for delivery in deliveries:
        time.sleep(IDLE)
        consumer.ack(delivery)
    assert writers.count(threading.current_thread().name) >= ROUNDS * 3 // 4, writers
    consumer.close()
    assert publisher.stats(["q"]) == [QueueStats("q", ready=0, leased=0)]


def test_a_publish_whose_write_fails_here_is_sent_again_by_the_io_thread(
    connect: Any,
) -> None:
    broker = connect()
    broker.declare_queue(Queue("q"))
    cut: list[bool] = []

    def cut_once() -> None:
        # The connection breaks under this thread's write, as a network failure would.
        if not cut:
            cut.append(True)
            broker.io._conn.sock.shutdown(socket.SHUT_RDWR)

    watch_writes(broker, before=cut_once)
    time.sleep(IDLE)
    broker.publish(envelope("survivor"), exchange="", routing_key="q")
    assert broker.publisher.flush(PATIENCE)
    assert cut, "the test's own thread never wrote: nothing was tried from here"
    assert broker.io.connections == 2  # the I/O thread noticed and reconnected
    other = connect()
    assert [d.envelope.body.decode() for d in fetch_all(other, "q", 1)] == ["survivor"]
    assert other.fetch(["q"], 1, timeout=0.5) == []  # and only once
