"""The acker: acks queued by the dispatch thread reach the broker in batches, in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from conveyor.brokers.memory import MemoryBroker
from conveyor.envelope import Delivery, Envelope
from conveyor.routing import Queue
from conveyor.worker.acker import Acker

LINGER = 0.05
QUEUE = "acked"


class CountingBroker(MemoryBroker):
    """A memory broker whose acks go through the acker (as Redis and SQLite ones do),
    noting each batch it is handed."""

    ack_linger = LINGER
    acks_wait = True

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[tuple[float, int]] = []
        self.acked = threading.Event()

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        super().ack_many(deliveries)
        self.batches.append((time.monotonic(), len(deliveries)))
        self.acked.set()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[CountingBroker]:
    broker = CountingBroker(f"memory://{tmp_path}")
    broker.declare_queue(Queue(QUEUE))
    yield broker
    MemoryBroker.reset_all()


def leased(broker: CountingBroker, count: int) -> list[Delivery]:
    for number in range(count):
        envelope = Envelope(str(number).encode(), "application/json", "utf-8", {}, {})
        broker.publish(envelope, exchange="", routing_key=QUEUE)
    deliveries = broker.fetch([QUEUE], count, timeout=1.0)
    assert len(deliveries) == count
    return deliveries


def leased_count(broker: CountingBroker) -> int:
    (stats,) = broker.stats([QUEUE])
    return stats.leased


def test_acks_queued_together_are_sent_together_within_the_linger(
        broker: CountingBroker) -> None:
    deliveries = leased(broker, 40)
    acker = Acker(broker)
    try:
        queued_at = time.monotonic()
        for delivery in deliveries:
            acker.ack([delivery])  # one at a time, as the dispatch thread starts jobs
        assert broker.acked.wait(5.0)
        sent_at, size = broker.batches[0]
        assert size == 40, broker.batches
        assert sent_at - queued_at >= LINGER * 0.9  # it waited for company
        assert leased_count(broker) == 0
        assert acker.unsent() == []
    finally:
        acker.close()


def test_an_ack_queued_after_a_batch_left_goes_in_the_next(broker: CountingBroker) -> None:
    first, second = leased(broker, 2)
    acker = Acker(broker)
    try:
        acker.ack([first])
        assert broker.acked.wait(5.0)
        broker.acked.clear()
        acker.ack([second])
        assert broker.acked.wait(5.0)
        assert [size for _, size in broker.batches] == [1, 1]
        assert leased_count(broker) == 0
    finally:
        acker.close()


def test_close_sends_what_is_queued_and_stops_the_thread(broker: CountingBroker) -> None:
    deliveries = leased(broker, 5)
    acker = Acker(broker)
    acker.ack(deliveries)
    acker.close()
    assert not acker._thread.is_alive()
    assert sum(size for _, size in broker.batches) == 5
    assert leased_count(broker) == 0


def test_acks_a_fetch_takes_along_are_not_sent_by_the_thread(broker: CountingBroker) -> None:
    deliveries = leased(broker, 3)
    acker = Acker(broker)
    try:
        acker.ack(deliveries)
        riders = acker.riders()
        assert riders is not None
        assert riders.deliveries == deliveries
        assert acker.riders() is None  # taken once
        time.sleep(LINGER * 3)
        assert broker.batches == []  # the thread woke, found nothing and sent nothing
        # On the wire with the fetch: should the process die now, the supervisor must
        # know to ack them again.
        assert {d.tag for d in acker.unsent()} == {d.tag for d in deliveries}
        broker.ack_many(riders.deliveries)  # what the broker does with the fetch
        riders.done(True)
        assert acker.unsent() == []
    finally:
        acker.close()
    assert [size for _, size in broker.batches] == [3]  # the ride's only: none sent twice
    assert leased_count(broker) == 0


def test_acks_whose_ride_failed_are_sent_by_the_thread(broker: CountingBroker) -> None:
    deliveries = leased(broker, 2)
    acker = Acker(broker)
    try:
        acker.ack(deliveries)
        riders = acker.riders()
        assert riders is not None
        riders.done(False)  # the connection broke, or Redis had lost the script
        assert broker.acked.wait(5.0)
        assert [size for _, size in broker.batches] == [2]
        assert leased_count(broker) == 0
        assert acker.unsent() == []
    finally:
        acker.close()


def test_after_a_ride_the_next_ack_waits_its_own_linger(broker: CountingBroker) -> None:
    first, second = leased(broker, 2)
    acker = Acker(broker)
    try:
        acker.ack([first])  # wakes the thread, which lingers for it
        time.sleep(LINGER * 0.6)
        riders = acker.riders()
        assert riders is not None
        riders.done(True)
        queued_at = time.monotonic()
        acker.ack([second])
        assert broker.acked.wait(5.0)
        sent_at, size = broker.batches[0]
        assert size == 1
        # Sent when the first ack's linger ended, it would have waited only 0.4 of one,
        # and a fetch about to leave could not have taken it along.
        assert sent_at - queued_at >= LINGER * 0.9
    finally:
        acker.close()


def test_acks_a_fetch_could_not_take_along_keep_their_age(broker: CountingBroker) -> None:
    # A fetch that takes acks and then cannot send them (a queue it reads is Celery's
    # fanout, its connection broke) hands them back: they leave when their first linger
    # ends, not a linger after the hand-back. Else a worker whose every fetch fails so
    # would hold its acks for as long as fetches keep coming.
    broker.ack_linger = 0.2
    (delivery,) = leased(broker, 1)
    acker = Acker(broker)
    try:
        queued_at = time.monotonic()
        acker.ack([delivery])
        time.sleep(0.12)
        riders = acker.riders()
        assert riders is not None
        time.sleep(0.04)
        riders.done(False)
        assert broker.acked.wait(5.0)
        sent_at, size = broker.batches[0]
        assert size == 1
        assert 0.18 <= sent_at - queued_at < 0.3  # a restarted linger: about 0.36
    finally:
        acker.close()
