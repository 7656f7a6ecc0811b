"""The broker contract (``conveyor.brokers.base``), run against every broker.

To add a broker, add a factory to ``FACTORIES``: it gets the test's ``tmp_path`` (use it
to give each test its own store: a file, a key prefix, a vhost) and a visibility timeout,
and returns a *new* broker object on that store each time it is called, so tests can play
a second consumer or reopen the broker.

Timings use short leases and delays (0.3 s) and assert only generous bounds: the lower
bounds are guarantees (a delayed message cannot arrive early), the upper ones are far
above anything a healthy broker needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.vhosts import contract_broker as amqp_contract_broker
from tests.redis.scratch import contract_broker as redis_contract_broker

from conveyor.brokers.base import Broker, QueueStats
from conveyor.brokers.memory import MemoryBroker
from conveyor.brokers.sqlite import SqliteBroker
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import ConfigurationError, EncodeError, RoutingError
from conveyor.routing import Binding, Exchange, Queue

Factory = Callable[[Path, float], Broker]
Connect = Callable[..., Broker]

FACTORIES: dict[str, Factory] = {
    "memory": lambda tmp_path, lease: MemoryBroker(
        f"memory://{tmp_path}", visibility_timeout=lease
    ),
    "sqlite": lambda tmp_path, lease: SqliteBroker(
        f"sqlite:///{tmp_path}/broker.db", visibility_timeout=lease
    ),
    "amqp": lambda tmp_path, lease: amqp_contract_broker(tmp_path, lease),
    "redis": lambda tmp_path, lease: redis_contract_broker(tmp_path, lease),
}

# Cases RabbitMQ cannot honour as written; tests/amqp/test_contract_variants.py checks what
# AMQP does instead.
AMQP_VARIANTS = {
    "test_lapsed_lease_is_redelivered_with_a_higher_count": "no visibility timeout on "
    "RabbitMQ: a delivery is held until ack, reject, or its channel closes",
    "test_a_stale_lease_cannot_touch_the_message_someone_else_holds": "no visibility "
    "timeout on RabbitMQ: a lease lapses when its channel closes",
    "test_purge_drops_ready_and_delayed_but_not_leased": "delayed messages wait in "
    "RabbitMQ's shared delay chain, where a purge of their queue cannot reach them",
}

LEASE = 0.3
DELAY = 0.3
PATIENCE = 5.0  # how long a fetch may block waiting for something that must come
PROMPT = 2.0  # "at once", on a noisy machine


@pytest.fixture(params=sorted(FACTORIES))
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Connect]:
    """Open broker objects on this test's store; all are closed after the test."""
    if request.param == "amqp" and request.node.originalname in AMQP_VARIANTS:
        pytest.skip(f"{AMQP_VARIANTS[request.node.originalname]} "
                    "(see tests/amqp/test_contract_variants.py)")
    factory = FACTORIES[request.param]
    opened: list[Broker] = []

    def open_broker(visibility_timeout: float = 60.0) -> Broker:
        broker = factory(tmp_path, visibility_timeout)
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()
    MemoryBroker.reset_all()


@pytest.fixture
def broker(connect: Connect) -> Broker:
    return connect()


def envelope(
    body: str | bytes, *, priority: int | None = None, headers: dict[str, Any] | None = None
) -> Envelope:
    data = body.encode() if isinstance(body, str) else body
    properties: dict[str, Any] = {} if priority is None else {"priority": priority}
    return Envelope(data, "application/json", "utf-8", dict(headers or {}), properties)


def bodies(deliveries: Sequence[Delivery]) -> list[str]:
    return [delivery.envelope.body.decode() for delivery in deliveries]


def drain(broker: Broker, queue: str, batch: int = 7) -> list[str]:
    """Fetch and ack everything visible in ``queue`` now, in delivery order."""
    received: list[str] = []
    while deliveries := broker.fetch([queue], batch, timeout=0):
        received += bodies(deliveries)
        broker.ack_many(deliveries)
    return received


def contents(broker: Broker, queues: Sequence[str]) -> dict[str, list[str]]:
    return {queue: drain(broker, queue) for queue in queues}


def fetch_one(broker: Broker, queue: str, timeout: float = PATIENCE) -> Delivery:
    deliveries = broker.fetch([queue], 1, timeout=timeout)
    assert len(deliveries) == 1, f"nothing arrived in {queue!r} within {timeout}s"
    return deliveries[0]


# -- the round trip ----------------------------------------------------------------------
def test_round_trip_keeps_body_headers_and_properties(broker: Broker) -> None:
    original = Envelope(
        body=bytes(range(256)) + "ünïcödé ✓".encode(),
        content_type="application/x-conveyor-test",
        content_encoding="binary",
        headers={
            "task": "proj.tasks.add",
            "id": "3c6b9a1e-0000-4000-8000-000000000001",
            "argsrepr": "('naïve', '日本語', '🚀')",
            "retries": 0,
            "eta": None,
            "timelimit": [None, 30.5],
            "nested": {"ok": True, "ratio": 0.25, "names": ["Zoë", "Ørjan"]},
        },
        properties={"correlation_id": "abc", "reply_to": "réponse", "delivery_mode": 2},
    )
    broker.publish(original, exchange="", routing_key="q")
    delivery = fetch_one(broker, "q")
    assert delivery.envelope == original
    assert (delivery.queue, delivery.exchange, delivery.routing_key) == ("q", "", "q")
    assert (delivery.redelivered, delivery.delivery_count) == (False, 1)
    assert delivery.delivery_info == {
        "exchange": "",
        "routing_key": "q",
        "priority": 0,
        "redelivered": False,
    }
    broker.ack(delivery)
    assert broker.fetch(["q"], 10, timeout=0) == []
    assert broker.stats(["q"]) == [QueueStats("q", ready=0)]


def test_changing_a_delivered_envelope_does_not_change_the_stored_message(
    broker: Broker,
) -> None:
    headers = {"task": "t", "meta": {"attempt": 1}}
    broker.publish(envelope("m", headers=headers), exchange="", routing_key="q")
    first = fetch_one(broker, "q")
    first.envelope.headers["meta"]["attempt"] = 99
    first.envelope.headers["added"] = True
    broker.reject(first, requeue=True)
    assert fetch_one(broker, "q").envelope.headers == headers


def test_headers_the_broker_cannot_carry_are_refused_and_nothing_is_sent(
    broker: Broker,
) -> None:
    good = envelope("good")
    bad = envelope("bad", headers={"not json": {1, 2}})
    with pytest.raises(EncodeError, match="headers"):
        broker.publish_many([(good, "", "q"), (bad, "", "q")])
    assert drain(broker, "q") == []


def test_fifo_within_a_priority(broker: Broker) -> None:
    sent = [str(n) for n in range(30)]
    for body in sent:
        broker.publish(envelope(body), exchange="", routing_key="q")
    assert drain(broker, "q") == sent


def test_higher_priority_is_served_first_then_fifo(broker: Broker) -> None:
    if not broker.supports_priority:
        pytest.skip("broker without priorities")
    priorities = [0, 5, 9, 1, 9, 5, 0, 3]
    for n, priority in enumerate(priorities):
        broker.publish(envelope(str(n), priority=priority), exchange="", routing_key="q")
    expected = sorted(range(len(priorities)), key=lambda n: (-priorities[n], n))
    assert drain(broker, "q") == [str(n) for n in expected]


def test_fetch_from_several_queues_orders_by_priority_then_age(broker: Broker) -> None:
    if not broker.supports_priority:
        pytest.skip("broker without priorities")
    for body, queue, priority in [("a0", "a", 0), ("b0", "b", 0), ("a5", "a", 5),
                                  ("b5", "b", 5), ("a1", "a", 0)]:  # fmt: skip
        broker.publish(envelope(body, priority=priority), exchange="", routing_key=queue)
    deliveries = broker.fetch(["a", "b"], 10, timeout=0)
    assert bodies(deliveries) == ["a5", "b5", "a0", "b0", "a1"]
    assert [d.queue for d in deliveries] == ["a", "b", "a", "b", "a"]


def test_fetch_returns_at_most_max_messages(broker: Broker) -> None:
    for n in range(5):
        broker.publish(envelope(str(n)), exchange="", routing_key="q")
    assert bodies(broker.fetch(["q"], 3, timeout=0)) == ["0", "1", "2"]
    assert bodies(broker.fetch(["q"], 10, timeout=0)) == ["3", "4"]
    assert broker.fetch(["q"], 10, timeout=0) == []


# -- routing -----------------------------------------------------------------------------
def test_direct_exchange_routes_by_exact_key(broker: Broker) -> None:
    orders = Exchange("orders", "direct")
    broker.declare_queue(Queue("created", orders, "order.created"))
    broker.declare_queue(Queue("audit", orders, "order.created"))
    broker.declare_queue(Queue("paid", orders, "order.paid"))
    for key in ["order.created", "order.paid", "order", "order.created.eu"]:
        broker.publish(envelope(key), exchange="orders", routing_key=key)
    assert contents(broker, ["created", "audit", "paid"]) == {
        "created": ["order.created"],
        "audit": ["order.created"],
        "paid": ["order.paid"],
    }


def test_topic_exchange_matches_words(broker: Broker) -> None:
    events = Exchange("events", "topic")
    patterns = {
        "star": "order.*",
        "hash": "order.#",
        "everything": "#",
        "middle": "*.eu.*",
        "tail": "#.error",
        "exact": "order.created",
    }
    for queue, pattern in patterns.items():
        broker.declare_queue(Queue(queue, events, pattern))
    keys = ["order.created", "order", "order.created.eu", "shop.eu.error", "error", "billing"]
    for key in keys:
        broker.publish(envelope(key), exchange="events", routing_key=key)
    assert contents(broker, list(patterns)) == {
        "star": ["order.created"],
        "hash": ["order.created", "order", "order.created.eu"],
        "everything": keys,
        "middle": ["shop.eu.error"],
        "tail": ["shop.eu.error", "error"],
        "exact": ["order.created"],
    }


def test_fanout_exchange_reaches_every_bound_queue_whatever_the_key(broker: Broker) -> None:
    news = Exchange("news", "fanout")
    for queue, key in [("one", "x"), ("two", "y"), ("three", "")]:
        broker.declare_queue(Queue(queue, news, key))
    broker.declare_queue(Queue("elsewhere", Exchange("other", "fanout")))
    broker.publish(envelope("hello"), exchange="news", routing_key="unrelated")
    assert contents(broker, ["one", "two", "three", "elsewhere"]) == {
        "one": ["hello"],
        "two": ["hello"],
        "three": ["hello"],
        "elsewhere": [],
    }


def test_headers_exchange_matches_all_or_any(broker: Broker) -> None:
    match = Exchange("match", "headers")
    wanted = {"format": "pdf", "type": "report"}
    broker.declare_queue(Queue("all", match, binding_arguments={"x-match": "all", **wanted}))
    broker.declare_queue(Queue("any", match, binding_arguments={"x-match": "any", **wanted}))
    broker.declare_queue(Queue("default", match, binding_arguments={"format": "pdf"}))
    messages = {
        "both": {"format": "pdf", "type": "report"},
        "format": {"format": "pdf", "type": "log"},
        "type": {"type": "report"},
        "neither": {"format": "zip", "other": "pdf"},
    }
    for name, headers in messages.items():
        broker.publish(envelope(name, headers=headers), exchange="match", routing_key="x")
    assert contents(broker, ["all", "any", "default"]) == {
        "all": ["both"],
        "any": ["both", "format", "type"],
        "default": ["both", "format"],
    }


def test_nameless_exchange_delivers_to_the_queue_named_by_the_key(broker: Broker) -> None:
    broker.declare_queue(Queue("declared", Exchange("tasks", "direct"), "other-key"))
    broker.publish(envelope("to declared"), exchange="", routing_key="declared")
    broker.publish(envelope("to undeclared"), exchange="", routing_key="fresh")
    assert contents(broker, ["declared", "fresh"]) == {
        "declared": ["to declared"],
        "fresh": ["to undeclared"],
    }


def test_celery_default_queue_is_bound_to_its_own_direct_exchange(broker: Broker) -> None:
    broker.declare_queue(Queue("celery"))
    broker.publish(envelope("task"), exchange="celery", routing_key="celery")
    assert drain(broker, "celery") == ["task"]


def test_bind_adds_a_binding_and_declarations_are_idempotent(broker: Broker) -> None:
    logs = Exchange("logs", "topic")
    queue = Queue("errors", logs, "*.error", bindings=(Binding("logs", "errors", "db.#"),))
    broker.declare_queue(queue)
    broker.declare_queue(queue)
    broker.declare_exchange(logs)
    broker.bind(Binding("logs", "errors", "*.error"))
    broker.bind(Binding("logs", "warnings", "*.warning"))
    for key in ["db.error", "web.error", "db.slow", "web.warning", "web.info"]:
        broker.publish(envelope(key), exchange="logs", routing_key=key)
    # db.error matches both bindings of "errors" and still arrives once.
    assert contents(broker, ["errors", "warnings"]) == {
        "errors": ["db.error", "web.error", "db.slow"],
        "warnings": ["web.warning"],
    }


def test_unroutable_message_is_dropped(broker: Broker) -> None:
    broker.declare_queue(Queue("a", Exchange("keys", "direct"), "a"))
    broker.publish(envelope("lost"), exchange="keys", routing_key="b")
    broker.declare_exchange(Exchange("unbound", "fanout"))
    broker.publish(envelope("lost too"), exchange="unbound", routing_key="a")
    every = broker.stats()
    assert "a" in [stats.name for stats in every]
    assert all((s.ready, s.delayed, s.leased) == (0, 0, 0) for s in every)


def test_unknown_exchange_is_an_error(broker: Broker) -> None:
    with pytest.raises(RoutingError, match="nowhere"):
        broker.publish(envelope("m"), exchange="nowhere", routing_key="q")
    with pytest.raises(RoutingError, match="nowhere"):
        broker.bind(Binding("nowhere", "q", "q"))


def test_publish_many_with_an_unknown_exchange_publishes_nothing(broker: Broker) -> None:
    items = [(envelope("ok"), "", "q"), (envelope("bad"), "nowhere", "q")]
    with pytest.raises(RoutingError, match="nowhere"):
        broker.publish_many(items)
    assert drain(broker, "q") == []


def test_an_exchange_keeps_its_type(broker: Broker) -> None:
    broker.declare_exchange(Exchange("typed", "direct"))
    with pytest.raises(ConfigurationError, match="typed"):
        broker.declare_exchange(Exchange("typed", "topic"))


# -- delays and leases -------------------------------------------------------------------
def test_delayed_message_stays_invisible_until_due(broker: Broker) -> None:
    broker.publish(envelope("later"), exchange="", routing_key="q", delay=DELAY)
    broker.publish(envelope("now"), exchange="", routing_key="q")
    start = time.monotonic()
    assert bodies(broker.fetch(["q"], 10, timeout=0)) == ["now"]
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, delayed=1, leased=1)]
    later = fetch_one(broker, "q")
    elapsed = time.monotonic() - start
    assert bodies([later]) == ["later"]
    assert DELAY * 0.8 <= elapsed < DELAY + PROMPT


def test_publish_many_is_delivered_in_order_and_honours_delay(broker: Broker) -> None:
    broker.declare_queue(Queue("fan1", Exchange("bulk", "fanout")))
    broker.declare_queue(Queue("fan2", Exchange("bulk", "fanout")))
    items = [(envelope(str(n)), "", "q") for n in range(200)]
    items.append((envelope("both"), "bulk", ""))
    broker.publish_many(items)
    assert contents(broker, ["q", "fan1", "fan2"]) == {
        "q": [str(n) for n in range(200)],
        "fan1": ["both"],
        "fan2": ["both"],
    }
    broker.publish_many([(envelope("d1"), "", "q"), (envelope("d2"), "", "q")], delay=DELAY)
    assert broker.fetch(["q"], 10, timeout=0) == []
    assert broker.stats(["q"])[0].delayed == 2
    deliveries = broker.fetch(["q"], 10, timeout=PATIENCE)
    deliveries += broker.fetch(["q"], 10, timeout=PATIENCE) if len(deliveries) < 2 else []
    assert bodies(deliveries) == ["d1", "d2"]


def test_lapsed_lease_is_redelivered_with_a_higher_count(connect: Connect) -> None:
    broker = connect(visibility_timeout=LEASE)
    broker.publish(envelope("m"), exchange="", routing_key="q")
    first = fetch_one(broker, "q")
    assert broker.fetch(["q"], 1, timeout=0) == []
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, leased=1)]
    second = fetch_one(broker, "q")
    assert (second.redelivered, second.delivery_count) == (True, 2)
    assert second.envelope == first.envelope
    assert second.tag != first.tag


def test_extend_keeps_a_message_leased_past_its_first_lease(connect: Connect) -> None:
    broker = connect(visibility_timeout=LEASE)
    broker.publish(envelope("long task"), exchange="", routing_key="q")
    delivery = fetch_one(broker, "q")
    broker.extend([delivery], seconds=30)
    time.sleep(LEASE * 2)
    assert broker.fetch(["q"], 1, timeout=0) == []
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, leased=1)]
    broker.ack(delivery)
    assert broker.stats(["q"]) == [QueueStats("q", ready=0)]


def test_a_stale_lease_cannot_touch_the_message_someone_else_holds(connect: Connect) -> None:
    slow = connect(visibility_timeout=LEASE)
    other = connect(visibility_timeout=60)
    slow.publish(envelope("m"), exchange="", routing_key="q")
    stale = fetch_one(slow, "q")
    fresh = fetch_one(other, "q")  # once the slow consumer's lease lapsed
    assert fresh.delivery_count == 2
    slow.ack(stale)
    slow.reject(stale, requeue=True)
    slow.reject(stale, requeue=False, reason="stale")
    slow.extend([stale], seconds=60)
    slow.defer(stale, time.time())
    assert other.stats(["q"]) == [QueueStats("q", ready=0, leased=1)]
    other.ack(fresh)
    assert other.stats(["q"]) == [QueueStats("q", ready=0)]


def test_a_late_ack_still_counts_while_nobody_took_the_message(connect: Connect) -> None:
    broker = connect(visibility_timeout=LEASE)
    broker.publish(envelope("m"), exchange="", routing_key="q")
    delivery = fetch_one(broker, "q")
    time.sleep(LEASE * 2)
    broker.ack(delivery)
    assert broker.fetch(["q"], 1, timeout=0) == []
    assert broker.stats(["q"]) == [QueueStats("q", ready=0)]


def test_reject_with_requeue_makes_the_message_visible_at_once(broker: Broker) -> None:
    broker.publish(envelope("m"), exchange="", routing_key="q")
    broker.reject(fetch_one(broker, "q"), requeue=True, reason="try again")
    again = fetch_one(broker, "q", timeout=0)
    assert (again.redelivered, again.delivery_count) == (True, 2)


def test_reject_without_requeue_dead_letters_the_message(broker: Broker) -> None:
    broker.publish(envelope("poison"), exchange="", routing_key="q")
    broker.reject(fetch_one(broker, "q"), requeue=False, reason="malformed body")
    assert broker.fetch(["q"], 1, timeout=0) == []
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, dead=1)]
    dead_letters = getattr(broker, "dead_letters", None)
    if dead_letters is not None:
        [dead] = dead_letters("q")
        assert (dead.envelope.body, dead.reason, dead.queue) == (b"poison", "malformed body", "q")


def test_defer_hands_the_message_back_until_the_given_time(broker: Broker) -> None:
    broker.publish(envelope("eta"), exchange="", routing_key="q")
    delivery = fetch_one(broker, "q")
    start = time.monotonic()
    broker.defer(delivery, time.time() + DELAY)
    assert broker.fetch(["q"], 1, timeout=0) == []
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, delayed=1)]
    again = fetch_one(broker, "q")
    assert time.monotonic() - start >= DELAY * 0.8
    assert again.envelope == delivery.envelope
    # Waiting for an eta is not a failed delivery.
    assert again.delivery_count == 1


# -- administration ----------------------------------------------------------------------
def test_purge_drops_ready_and_delayed_but_not_leased(broker: Broker) -> None:
    broker.publish(envelope("held"), exchange="", routing_key="q")
    held = fetch_one(broker, "q")
    for n in range(3):
        broker.publish(envelope(f"ready {n}"), exchange="", routing_key="q")
    for n in range(2):
        broker.publish(envelope(f"delayed {n}"), exchange="", routing_key="q", delay=60)
    assert broker.purge("q") == 5
    assert broker.stats(["q"]) == [QueueStats("q", ready=0, leased=1)]
    assert broker.purge("q") == 0
    assert broker.purge("never-declared") == 0
    broker.ack(held)
    assert broker.stats(["q"]) == [QueueStats("q", ready=0)]


def test_stats_count_each_state(broker: Broker) -> None:
    broker.declare_queue(Queue("a"))
    broker.declare_queue(Queue("b"))
    broker.publish(envelope("1"), exchange="a", routing_key="a")
    broker.publish(envelope("2"), exchange="a", routing_key="a")
    broker.publish(envelope("3"), exchange="a", routing_key="a", delay=60)
    fetch_one(broker, "a")
    broker.publish(envelope("4"), exchange="b", routing_key="b")
    broker.reject(fetch_one(broker, "b"), requeue=False, reason="no")
    assert broker.stats(["a", "b", "unknown"]) == [
        QueueStats("a", ready=1, delayed=1, leased=1, dead=0),
        QueueStats("b", ready=0, delayed=0, leased=0, dead=1),
        QueueStats("unknown", ready=0),
    ]
    every = {stats.name: stats for stats in broker.stats()}
    assert {"a", "b"} <= set(every)
    assert "unknown" not in every
    assert every["a"] == QueueStats("a", ready=1, delayed=1, leased=1, dead=0)


def test_ack_many_acks_every_delivery(broker: Broker) -> None:
    broker.publish_many([(envelope(str(n)), "", "q") for n in range(5)])
    broker.ack_many(broker.fetch(["q"], 5, timeout=0))
    assert broker.stats(["q"]) == [QueueStats("q", ready=0)]


# -- blocking and waking -----------------------------------------------------------------
def test_fetch_on_an_empty_queue_returns_nothing_after_the_timeout(broker: Broker) -> None:
    start = time.monotonic()
    assert broker.fetch(["empty"], 1, timeout=0.3) == []
    assert 0.25 <= time.monotonic() - start < 0.3 + PROMPT


def run_in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        result["value"] = work()
        result["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_wake_interrupts_a_fetch_blocked_in_another_thread(broker: Broker) -> None:
    thread, result = run_in_thread(lambda: broker.fetch(["q"], 1, timeout=30))
    time.sleep(0.2)
    woken_at = time.monotonic()
    broker.wake()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    assert result["value"] == []
    assert result["at"] - woken_at < PROMPT
    # The wake was used up: the next fetch blocks, and messages flow as before.
    start = time.monotonic()
    assert broker.fetch(["q"], 1, timeout=0.3) == []
    assert time.monotonic() - start >= 0.25
    broker.publish(envelope("after"), exchange="", routing_key="q")
    assert bodies([fetch_one(broker, "q")]) == ["after"]


def test_a_wake_just_before_a_fetch_blocks_is_not_lost(broker: Broker) -> None:
    # Shutdown can call wake() between two fetches of the consumer loop. A poll that
    # would not block leaves the wake for the fetch that would.
    broker.wake()
    assert broker.fetch(["q"], 1, timeout=0) == []
    start = time.monotonic()
    assert broker.fetch(["q"], 1, timeout=30) == []
    assert time.monotonic() - start < PROMPT


def test_publish_wakes_a_fetch_blocked_in_another_thread(connect: Connect) -> None:
    consumer, producer = connect(), connect()
    thread, result = run_in_thread(lambda: consumer.fetch(["q"], 1, timeout=30))
    time.sleep(0.2)
    published_at = time.monotonic()
    producer.publish(envelope("wake up"), exchange="", routing_key="q")
    thread.join(PATIENCE)
    assert not thread.is_alive()
    assert bodies(result["value"]) == ["wake up"]
    assert result["at"] - published_at < PROMPT


def test_threads_sharing_one_broker_get_every_message_once(broker: Broker) -> None:
    sent = [str(n) for n in range(400)]
    broker.publish_many([(envelope(body), "", "q") for body in sent])
    received: list[list[str]] = [[] for _ in range(4)]

    def consume(mine: list[str]) -> None:
        while deliveries := broker.fetch(["q"], 3, timeout=0.2):
            mine += bodies(deliveries)
            broker.ack_many(deliveries)

    threads = [threading.Thread(target=consume, args=(mine,)) for mine in received]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = [body for mine in received for body in mine]
    assert sorted(everything, key=int) == sent
    assert broker.stats(["q"]) == [QueueStats("q", ready=0)]


# -- SQLite: durability and several processes --------------------------------------------
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shared.db"


def test_sqlite_keeps_messages_and_topology_across_reopen(sqlite_url: str) -> None:
    with SqliteBroker(sqlite_url, visibility_timeout=LEASE) as first:
        first.declare_queue(Queue("jobs", Exchange("work", "topic"), "jobs.#"))
        first.publish(envelope("leased"), exchange="work", routing_key="jobs.a")
        first.publish(envelope("ready"), exchange="work", routing_key="jobs.b")
        first.publish(envelope("delayed"), exchange="work", routing_key="jobs.c", delay=DELAY)
        assert bodies(first.fetch(["jobs"], 1, timeout=0)) == ["leased"]
    with SqliteBroker(sqlite_url, visibility_timeout=60) as second:
        second.publish(envelope("routed"), exchange="work", routing_key="jobs.d")
        received: list[tuple[str, int]] = []
        deadline = time.monotonic() + PATIENCE
        while len(received) < 4 and time.monotonic() < deadline:
            deliveries = second.fetch(["jobs"], 10, timeout=PATIENCE)
            received += [(d.envelope.body.decode(), d.delivery_count) for d in deliveries]
            second.ack_many(deliveries)
    assert sorted(received) == [("delayed", 1), ("leased", 2), ("ready", 1), ("routed", 1)]


def test_sqlite_close_closes_every_thread_connection_and_reopens_on_use(
    sqlite_url: str,
) -> None:
    broker = SqliteBroker(sqlite_url)
    published, closed = threading.Event(), threading.Event()

    def publish_and_linger() -> None:
        broker.publish(envelope("from thread"), exchange="", routing_key="q")
        published.set()
        closed.wait(PATIENCE)

    thread = threading.Thread(target=publish_and_linger)
    thread.start()
    published.wait(PATIENCE)
    broker.publish(envelope("from main"), exchange="", routing_key="q")
    wal = broker.path.with_name(broker.path.name + "-wal")
    assert wal.exists()
    broker.close()
    # SQLite removes the write-ahead log when its last connection closes.
    assert not wal.exists()
    closed.set()
    thread.join()
    assert drain(broker, "q") == ["from thread", "from main"]
    broker.close()
    assert not wal.exists()


def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = SqliteBroker("sqlite:///nested/dirs/relative.db")
    relative.publish(envelope("m"), exchange="", routing_key="q")
    relative.close()
    assert relative.path == tmp_path / "nested" / "dirs" / "relative.db"
    assert relative.path.is_file()
    assert SqliteBroker(f"sqlite:///{tmp_path}/absolute.db").path == tmp_path / "absolute.db"
    for bad in ["sqlite://", "sqlite:///", "sqlite://host/x.db", "sqlite:///:memory:", "x.db"]:
        with pytest.raises(ConfigurationError):
            SqliteBroker(bad)


def test_sqlite_retries_while_another_connection_holds_the_write_lock(sqlite_url: str) -> None:
    import sqlite3

    broker = SqliteBroker(sqlite_url)
    broker.declare_queue(Queue("q"))
    broker.busy_timeout = 0.01  # so SQLite itself gives up at once and the broker retries
    broker.close()
    blocker = sqlite3.connect(broker.path, isolation_level=None, check_same_thread=False)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        releaser = threading.Timer(0.5, lambda: blocker.execute("COMMIT"))
        releaser.start()
        broker.publish(envelope("m"), exchange="", routing_key="q")
        releaser.join()
    finally:
        blocker.close()
    assert drain(broker, "q") == ["m"]
    broker.close()


def test_sqlite_connection_is_not_shared_with_a_forked_child(sqlite_url: str) -> None:
    import os

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    broker = SqliteBroker(sqlite_url)
    broker.publish(envelope("from parent"), exchange="", routing_key="q")
    pid = os.fork()
    if pid == 0:  # the child: must never return into pytest
        code = 1
        try:
            broker.publish(envelope("from child"), exchange="", routing_key="q")
            broker.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert drain(broker, "q") == ["from parent", "from child"]
    broker.close()


def spawn(script: str, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


CONSUMER = """
import json, sys
from conveyor.brokers.sqlite import SqliteBroker
broker = SqliteBroker(sys.argv[1], visibility_timeout=60)
broker.fetch(["work"], 1, timeout=0)
print("ready", flush=True)
seen, stopping = [], False
while not stopping:
    deliveries = broker.fetch(["work"], 5, timeout=30)
    if not deliveries:
        break
    for delivery in deliveries:
        if stopping:
            broker.reject(delivery, requeue=True)
            continue
        if delivery.envelope.body == b"stop":
            stopping = True
        else:
            seen.append(delivery.envelope.body.decode())
        broker.ack(delivery)
broker.close()
print(json.dumps(seen), flush=True)
"""


def test_sqlite_two_processes_share_a_queue_and_get_each_message_once(sqlite_url: str) -> None:
    import json

    consumers = [spawn(CONSUMER, sqlite_url) for _ in range(2)]
    try:
        for consumer in consumers:
            assert consumer.stdout.readline().strip() == "ready"
        sent = [str(n) for n in range(500)]
        with SqliteBroker(sqlite_url) as producer:
            for start in range(0, len(sent), 10):
                batch = sent[start : start + 10]
                producer.publish_many([(envelope(body), "", "work") for body in batch])
                time.sleep(0.005)
            producer.publish_many([(envelope("stop"), "", "work")] * 2)
        outputs = [consumer.communicate(timeout=60) for consumer in consumers]
    finally:
        for consumer in consumers:
            if consumer.poll() is None:
                consumer.kill()
                consumer.communicate()
    for consumer, (_, errors) in zip(consumers, outputs, strict=True):
        assert consumer.returncode == 0, errors
    received = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    everything = received[0] + received[1]
    assert len(everything) == len(sent)
    assert sorted(everything, key=int) == sent
    assert all(received), "both consumers should have taken part"


WAITER = """
import sys, time
from conveyor.brokers.sqlite import SqliteBroker
broker = SqliteBroker(sys.argv[1])
broker.fetch(["wake"], 1, timeout=0)
print("ready", flush=True)
deliveries = broker.fetch(["wake"], 1, timeout=30)
print(time.time(), len(deliveries), flush=True)
broker.close()
"""


def test_sqlite_publish_wakes_a_fetch_blocked_in_another_process(sqlite_url: str) -> None:
    waiter = spawn(WAITER, sqlite_url)
    try:
        assert waiter.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # long enough for the waiter's polling to have slowed to its cap
        with SqliteBroker(sqlite_url) as producer:
            published_at = time.time()
            producer.publish(envelope("ping"), exchange="", routing_key="wake")
        out, errors = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, errors
    received_at, count = out.split()
    assert count == "1"
    assert float(received_at) - published_at < PROMPT
