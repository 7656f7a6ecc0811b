"""What RabbitMQ does where the broker contract suite's wording can't apply to it.

``tests/contract/test_broker.py`` runs against :class:`AmqpBroker` too; the cases listed in
its ``AMQP_VARIANTS`` (leases that lapse by time, purging delayed messages) and the
priority cases it skips for brokers with priorities on some queues only are checked here
in their AMQP form.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from conveyor.brokers.amqp import AmqpBroker
from conveyor.brokers.base import QueueStats
from conveyor.envelope import Delivery, Envelope
from conveyor.routing import Queue

PATIENCE = 5.0


def envelope(body: str, priority: int | None = None) -> Envelope:
    properties: dict[str, Any] = {} if priority is None else {"priority": priority}
    return Envelope(body.encode(), "application/json", "utf-8", {}, properties)


def bodies(deliveries: list[Delivery]) -> list[str]:
    return [delivery.envelope.body.decode() for delivery in deliveries]


def fetch_one(broker: AmqpBroker, queue: str) -> Delivery:
    deliveries = broker.fetch([queue], 1, timeout=PATIENCE)
    assert len(deliveries) == 1, f"nothing arrived in {queue!r}"
    return deliveries[0]


def cut(broker: AmqpBroker) -> None:
    """Kill the broker's TCP connection from its side, as a network failure would."""
    broker.io.call(lambda conn: conn.sock.shutdown(socket.SHUT_RDWR))


def test_a_lease_lasts_until_its_channel_closes_then_the_message_comes_back(
    connect: Any,
) -> None:
    holder, other = connect(), connect()
    holder.publish(envelope("m"), exchange="", routing_key="q")
    first = fetch_one(holder, "q")
    time.sleep(0.5)  # no visibility timeout: nobody else gets it meanwhile
    assert other.fetch(["q"], 1, timeout=0) == []
    assert holder.stats(["q"]) == [QueueStats("q", ready=0, leased=1)]
    holder.close()  # the holder's channel goes: RabbitMQ delivers the message again
    second = fetch_one(other, "q")
    assert (second.redelivered, second.delivery_count) == (True, 2)
    assert second.envelope == first.envelope
    other.ack(second)


def test_a_stale_delivery_cannot_touch_the_message_someone_else_holds(connect: Any) -> None:
    slow, other = connect(), connect()
    slow.publish(envelope("m"), exchange="", routing_key="q")
    stale = fetch_one(slow, "q")
    assert other.fetch(["q"], 1, timeout=0) == []  # other is consuming too
    cut(slow)  # slow's channel dies: its lease lapses
    fresh = fetch_one(other, "q")
    assert fresh.delivery_count == 2
    # Wait for the reconnect itself: until slow's I/O thread reads the dead socket,
    # `connected` still reports the old connection.
    deadline = time.monotonic() + PATIENCE
    while not (slow.io.connected and slow.io.connections >= 2):
        assert time.monotonic() < deadline, "slow did not reconnect"
        time.sleep(0.05)
    slow.ack(stale)
    slow.reject(stale, requeue=True)
    slow.reject(stale, requeue=False, reason="stale")
    slow.extend([stale], seconds=60)
    slow.defer(stale, time.time())
    assert other.stats(["q"]) == [QueueStats("q", ready=0, leased=1)]
    assert slow.stats(["q"]) == [QueueStats("q", ready=0, leased=0)]
    other.ack(fresh)
    assert other.stats(["q"]) == [QueueStats("q", ready=0)]


def test_purge_drops_ready_but_not_leased_and_delayed_messages_still_arrive(
    connect: Any,
) -> None:
    broker = connect()
    broker.publish(envelope("held"), exchange="", routing_key="q")
    held = fetch_one(broker, "q")
    for n in range(3):
        broker.publish(envelope(f"ready {n}"), exchange="", routing_key="q")
    broker.publish(envelope("delayed"), exchange="", routing_key="q", delay=0.3)
    assert broker.purge("q") == 3  # including any RabbitMQ had pushed to this process
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, delayed=1, leased=1)]
    assert broker.purge("never-declared") == 0
    assert bodies([fetch_one(broker, "q")]) == ["delayed"]  # the chain is not purged
    broker.ack(held)


def test_priorities_on_a_queue_with_x_max_priority(connect: Any) -> None:
    broker = connect()
    broker.declare_queue(Queue("prio", max_priority=9))
    priorities = [0, 5, 9, 1, 9, 5, 0, 3]
    for n, priority in enumerate(priorities):
        broker.publish(envelope(str(n), priority), exchange="", routing_key="prio")
    expected = sorted(range(len(priorities)), key=lambda n: (-priorities[n], n))
    received = []
    while deliveries := broker.fetch(["prio"], 3, timeout=0):
        received += bodies(deliveries)
        broker.ack_many(deliveries)
    assert received == [str(n) for n in expected]


def test_several_queues_keep_their_own_order_and_a_batch_is_by_priority(
    connect: Any,
) -> None:
    # RabbitMQ orders each queue on its own; one fetch from several queues returns what
    # has arrived highest priority first, then in order of arrival.
    broker = connect()
    for name in ("a", "b"):
        broker.declare_queue(Queue(name, max_priority=9))
    for body, queue, priority in [("a0", "a", 0), ("b0", "b", 0), ("a5", "a", 5),
                                  ("b5", "b", 5), ("a1", "a", 0)]:  # fmt: skip
        broker.publish(envelope(body, priority), exchange="", routing_key=queue)
    deliveries: list[Delivery] = []
    while len(deliveries) < 5:
        batch = broker.fetch(["a", "b"], 10, timeout=PATIENCE)
        assert batch
        priorities = [d.envelope.priority for d in batch]
        assert priorities == sorted(priorities, reverse=True)
        deliveries += batch
    by_queue = {
        name: [b for b, d in zip(bodies(deliveries), deliveries, strict=True) if d.queue == name]
        for name in ("a", "b")
    }
    assert by_queue == {"a": ["a5", "a0", "a1"], "b": ["b5", "b0"]}
    broker.ack_many(deliveries)


def test_acks_queued_just_before_close_reach_rabbitmq(connect: Any) -> None:
    # A retiring process acks its last tasks and closes at once: acks still waiting for
    # the I/O thread's next turn must go out before the connection closes, or RabbitMQ
    # delivers those tasks again.
    holder, other = connect(), connect()
    for round_ in range(10):
        holder.publish(envelope(f"m{round_}"), exchange="", routing_key="q")
    deliveries: list[Delivery] = []
    while len(deliveries) < 10:
        deliveries += holder.fetch(["q"], 10 - len(deliveries), timeout=PATIENCE)
    holder.ack_many(deliveries)
    holder.close()
    assert other.fetch(["q"], 1, timeout=1.0) == []
    assert other.stats(["q"]) == [QueueStats("q", ready=0, leased=0)]
