"""What only the Redis broker promises: kombu's layout, leases that Celery's restore rule
respects, restoring what dead workers of either kind left, atomic fetch, wake-ups without
polling, fanout over kombu's channels, eta waiting in Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.redis.conftest import PrivateRedis
from tests.redis.scratch import ScratchRedisBroker

import redis
from conveyor import Conveyor, Exchange, Queue, testing
from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis_layout import encode_envelope
from conveyor.brokers.redis_routing import new_delivery_tag
from conveyor.envelope import Envelope

PROMPT = 2.0
PATIENCE = 10.0


@pytest.fixture
def connect(redis_url: str, prefix: str) -> Iterator[Callable[..., RedisBroker]]:
    opened: list[RedisBroker] = []

    def open_broker(**options: Any) -> RedisBroker:
        broker = ScratchRedisBroker(redis_url, global_keyprefix=prefix, **options)
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, protocol=2)
    yield client
    client.close()


def envelope(body: str, priority: int = 0, **headers: Any) -> Envelope:
    return Envelope(
        body.encode(), "application/json", "utf-8", {"task": "t", **headers}, {"priority": priority}
    )


def kombu_payload(body: str, queue: str = "q", priority: int = 0) -> str:
    """An envelope as a Celery producer writes it."""
    return encode_envelope(envelope(body, priority), "", queue, new_delivery_tag())


# -- kombu's layout ----------------------------------------------------------------------
def test_messages_bindings_and_priorities_use_kombus_keys(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str
) -> None:
    broker = connect()
    broker.declare_queue(Queue("star", Exchange("events", "topic"), "order.*"))
    broker.declare_queue(Queue("direct", Exchange("orders", "direct"), "created"))
    for priority in (0, 2, 3, 5, 6, 9):
        broker.publish(envelope(f"p{priority}", priority), exchange="", routing_key="q")
    sep = "\x06\x16"
    assert raw.llen(f"{prefix}q") == 2  # 0 and 2: step 0
    assert raw.llen(f"{prefix}q{sep}3") == 2
    assert raw.llen(f"{prefix}q{sep}6") == 1
    assert raw.llen(f"{prefix}q{sep}9") == 1
    stored = json.loads(raw.lindex(f"{prefix}q", -1))  # the head: first in, first out
    assert base64_decode(stored["body"]) == b"p0"
    assert stored["content-type"] == "application/json"
    assert stored["content-encoding"] == "utf-8"
    assert stored["headers"] == {"task": "t"}
    properties = stored["properties"]
    assert properties["delivery_info"] == {"exchange": "", "routing_key": "q"}
    assert properties["body_encoding"] == "base64"
    assert len(properties["delivery_tag"]) == 36
    assert properties["priority"] == 0
    assert raw.smembers(f"{prefix}_kombu.binding.events") == {
        f"order.*{sep}^order\\.[^\\.]+${sep}star".encode()
    }
    assert raw.smembers(f"{prefix}_kombu.binding.orders") == {f"created{sep}{sep}direct".encode()}
    assert raw.smembers(f"{prefix}_kombu.binding_permanent.orders") == {
        f"created{sep}{sep}direct".encode()
    }
    assert all(key.startswith(prefix.encode()) for key in raw.scan_iter(f"{prefix}*"))


def base64_decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def test_celerys_order_lower_priority_steps_first(connect: Callable[..., RedisBroker]) -> None:
    broker = connect()
    for n, priority in enumerate([9, 0, 6, 3, 0, 5, 9, 1]):
        broker.publish(envelope(f"{n}", priority), exchange="", routing_key="q")
    taken = broker.fetch(["q"], 10, timeout=0)
    assert [d.envelope.body.decode() for d in taken] == ["1", "4", "7", "3", "5", "2", "0", "6"]


def test_a_topic_binding_routes_kombus_publishes(
    connect: Callable[..., RedisBroker], redis_url: str, prefix: str
) -> None:
    from kombu import Connection
    from kombu import Exchange as KombuExchange

    broker = connect()
    broker.declare_queue(Queue("star", Exchange("events", "topic"), "order.*"))
    broker.declare_queue(Queue("hash", Exchange("events", "topic"), "order.#"))
    with Connection(redis_url, transport_options={"global_keyprefix": prefix}) as conn:
        producer = conn.Producer()
        for key in ("order.created", "order.created.eu", "billing"):
            producer.publish(
                {"key": key},
                exchange=KombuExchange("events", "topic"),
                routing_key=key,
                declare=[KombuExchange("events", "topic")],
            )
    star = broker.fetch(["star"], 10, timeout=0)
    hashed = broker.fetch(["hash"], 10, timeout=0)
    assert [json.loads(d.envelope.body)["key"] for d in star] == ["order.created"]
    assert sorted(json.loads(d.envelope.body)["key"] for d in hashed) == [
        "order.created",
        "order.created.eu",
    ]


# -- leases and restores ----------------------------------------------------------------
def kombu_restore(redis_url: str, prefix: str, visibility_timeout: float) -> None:
    """What a Celery worker's periodic ``restore_visible`` does."""
    from kombu import Connection

    options = {"global_keyprefix": prefix, "visibility_timeout": visibility_timeout}
    with Connection(redis_url, transport_options=options) as conn:
        conn.default_channel.qos.restore_visible(num=100)


def test_a_renewed_lease_is_never_restored_by_celerys_rule(
    connect: Callable[..., RedisBroker], raw: redis.Redis, redis_url: str, prefix: str
) -> None:
    broker = connect(visibility_timeout=1)
    broker.publish(envelope("held"), exchange="", routing_key="q")
    broker.publish(envelope("dropped"), exchange="", routing_key="q")
    held, dropped = broker.fetch(["q"], 2, timeout=0)
    assert held.envelope.body == b"held"
    until = time.monotonic() + 1.5
    while time.monotonic() < until:  # a live worker renewing its lease
        broker.extend([held])
        time.sleep(0.2)
    kombu_restore(redis_url, prefix, visibility_timeout=1)
    # Celery's rule gave back the one nobody renewed, and only that one.
    assert raw.llen(f"{prefix}q") == 1
    again = broker.fetch(["q"], 10, timeout=0)
    assert [d.envelope.body for d in again] == [b"dropped"]
    assert (again[0].redelivered, again[0].delivery_count) == (True, 2)
    broker.ack(dropped)  # its first lease is stale now: no effect on the new one
    assert broker.stats(["q"])[0].leased == 2
    broker.ack_many([held, *again])
    assert broker.stats(["q"])[0].leased == 0
    assert raw.hlen(f"{prefix}unacked") == 0


def leave_as_dead_celery_worker(
    raw: redis.Redis, prefix: str, bodies: list[str], delivered_ago: float
) -> None:
    """The unacked records a Celery worker killed mid-task leaves behind."""
    for body in bodies:
        payload = json.loads(kombu_payload(body))
        tag = payload["properties"]["delivery_tag"]
        raw.hset(f"{prefix}unacked", tag, json.dumps([payload, "", "q"]))
        raw.zadd(f"{prefix}unacked_index", {tag: time.time() - delivered_ago})


def test_what_a_dead_celery_worker_held_comes_back_marked_redelivered(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str
) -> None:
    leave_as_dead_celery_worker(raw, prefix, ["lost"], delivered_ago=100)
    leave_as_dead_celery_worker(raw, prefix, ["recent"], delivered_ago=1)
    broker = connect(visibility_timeout=30)
    [delivery] = broker.fetch(["q"], 10, timeout=PATIENCE)
    assert delivery.envelope.body == b"lost"
    assert delivery.redelivered
    assert delivery.envelope.headers["redelivered"] is True  # kombu's marks
    assert delivery.delivery_count == 2
    assert raw.hlen(f"{prefix}unacked") == 2  # "recent" (not lapsed) and ours
    broker.ack(delivery)


def test_each_restore_scan_is_bounded(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str
) -> None:
    leave_as_dead_celery_worker(raw, prefix, [str(n) for n in range(250)], delivered_ago=100)
    broker = connect(visibility_timeout=30, unacked_restore_limit=100)
    assert len(broker.fetch(["q"], 1, timeout=0)) == 1
    assert raw.llen(f"{prefix}q") == 99
    assert raw.hlen(f"{prefix}unacked") == 151


CRASHING_CONSUMER = """
import os, sys
from tests.redis.scratch import ScratchRedisBroker
broker = ScratchRedisBroker(sys.argv[1], global_keyprefix=sys.argv[2], visibility_timeout=1)
taken = broker.fetch(["q"], 5, timeout=5)
print(len(taken), flush=True)
os._exit(9)  # dies holding them: no ack, no close, nothing given back
"""


def test_a_consumer_killed_after_fetching_loses_nothing(
    connect: Callable[..., RedisBroker], redis_url: str, prefix: str
) -> None:
    broker = connect(visibility_timeout=1)
    for n in range(8):
        broker.publish(envelope(str(n)), exchange="", routing_key="q")
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CONSUMER, redis_url, prefix],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert child.stdout.strip() == "5", child.stderr
    received: dict[str, int] = {}
    deadline = time.monotonic() + PATIENCE
    while len(received) < 8 and time.monotonic() < deadline:
        for delivery in broker.fetch(["q"], 10, timeout=1):
            received[delivery.envelope.body.decode()] = delivery.delivery_count
            broker.ack(delivery)
    assert sorted(received, key=int) == [str(n) for n in range(8)]
    assert sorted(received.values()) == [1, 1, 1, 2, 2, 2, 2, 2]


# -- waking --------------------------------------------------------------------------------
def fetch_in_thread(
    broker: RedisBroker, queues: list[str]
) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        result["deliveries"] = broker.fetch(queues, 1, timeout=30)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("priority", [0, 9])
def test_a_push_by_any_client_wakes_an_idle_fetch(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str, priority: int
) -> None:
    broker = connect()
    broker.fetch(["q", "other"], 1, timeout=0)
    thread, result = fetch_in_thread(broker, ["q", "other"])
    time.sleep(0.3)  # blocked by now
    key = f"{prefix}q" if priority == 0 else f"{prefix}q\x06\x169"
    pushed_at = time.monotonic()
    raw.lpush(key, kombu_payload("from celery", priority=priority))  # as kombu does
    thread.join(PATIENCE)
    assert [d.envelope.body for d in result["deliveries"]] == [b"from celery"]
    assert result["at"] - pushed_at < PROMPT


def test_without_client_tracking_an_idle_fetch_polls(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, "--rename-command", "CLIENT", "")
    server.start()
    broker = RedisBroker(server.url, polling_interval=0.1)
    pusher = redis.Redis(port=server.port, protocol=2)
    try:
        thread, result = fetch_in_thread(broker, ["q"])
        time.sleep(0.3)
        pushed_at = time.monotonic()
        pusher.lpush("q", kombu_payload("polled"))
        thread.join(PATIENCE)
        assert [d.envelope.body for d in result["deliveries"]] == [b"polled"]
        assert result["at"] - pushed_at < PROMPT
        assert not broker._waiter.listener.tracking_supported
    finally:
        pusher.close()
        broker.close()
        server.kill()


# -- fanout --------------------------------------------------------------------------------
def test_fanout_reaches_celery_subscribers_and_celery_fanouts_reach_us(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str, redis_url: str
) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    channel = f"{prefix}/{db}.news"
    broker = connect()
    broker.declare_queue(Queue("mine", Exchange("news", "fanout")))
    subscriber = raw.pubsub()
    subscriber.psubscribe(channel)  # a Celery consumer of a fanout queue
    try:
        assert subscriber.get_message(timeout=2)["type"] == "psubscribe"
        broker.publish(envelope("from us"), exchange="news", routing_key="")
        heard = subscriber.get_message(timeout=PROMPT)
        assert heard is not None
        assert heard["channel"] == channel.encode()
        assert base64_decode(json.loads(heard["data"])["body"]) == b"from us"
    finally:
        subscriber.close()
    [listed] = broker.fetch(["mine"], 10, timeout=0)  # our own copy waited in the list
    assert listed.envelope.body == b"from us"
    broker.ack(listed)
    thread, result = fetch_in_thread(broker, ["mine"])
    time.sleep(0.3)
    raw.publish(channel, kombu_payload("from celery", queue=""))  # kombu's fanout publish
    thread.join(PATIENCE)
    [delivery] = result["deliveries"]
    assert delivery.envelope.body == b"from celery"
    broker.ack(delivery)
    assert broker.stats(["mine"])[0].leased == 0


# -- eta, dead letters -------------------------------------------------------------------
def test_a_far_eta_waits_in_redis_not_in_the_worker(
    interop: dict[str, str], conveyor_app: Conveyor, raw: redis.Redis, prefix: str
) -> None:
    far = conveyor_app.send_task("interop.add", (1, 1), eta=datetime.now(UTC) + timedelta(hours=3))
    with testing.running_worker(conveyor_app, pool="threads", concurrency=1) as worker:
        assert conveyor_app.send_task("interop.add", (2, 2)).get(timeout=PATIENCE) == 4
        deadline = time.monotonic() + PATIENCE
        while raw.zcard(f"{prefix}_conveyor.delayed.celery") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert worker.consumer.inflight == 0
        while raw.hlen(f"{prefix}unacked") != 0:  # acks travel in batches, a moment later
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert raw.llen(f"{prefix}celery") == 0
        due = raw.zscore(
            f"{prefix}_conveyor.delayed.celery",
            raw.zrange(f"{prefix}_conveyor.delayed.celery", 0, 0)[0],
        )
        assert due is not None
        assert abs(due - (time.time() + 3 * 3600)) < 60
    assert far.state == "PENDING"


def test_dead_letters_are_kept_up_to_a_cap(connect: Callable[..., RedisBroker]) -> None:
    broker = connect(dead_letter_limit=3)
    for n in range(5):
        broker.publish(envelope(str(n)), exchange="", routing_key="q")
    for delivery in broker.fetch(["q"], 5, timeout=0):
        broker.reject(delivery, requeue=False, reason=f"bad {delivery.envelope.body.decode()}")
    letters = broker.dead_letters("q")
    assert [letter.reason for letter in letters] == ["bad 2", "bad 3", "bad 4"]
    assert letters[0].envelope == envelope("2")
    assert broker.stats(["q"])[0].dead == 3


def test_a_list_value_that_is_not_an_envelope_is_dead_lettered(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str
) -> None:
    broker = connect()
    raw.lpush(f"{prefix}q", b"\xff not json")
    raw.lpush(f"{prefix}q", kombu_payload("fine"))
    assert [d.envelope.body for d in broker.fetch(["q"], 10, timeout=0)] == [b"fine"]
    [letter] = broker.dead_letters("q")
    assert "not a kombu envelope" in letter.reason


def test_a_delivery_settles_from_the_reference_a_process_record_keeps(
    connect: Callable[..., RedisBroker],
) -> None:
    import pickle

    from conveyor.envelope import Delivery
    from conveyor.errors import BrokerError
    from conveyor.worker.slot import delivery_from_ref, delivery_ref

    broker = connect()
    broker.publish(envelope("kept"), exchange="", routing_key="q")
    (delivery,) = broker.fetch(["q"], 1, timeout=PROMPT)
    # What the supervisor reads back from a dead process's record.
    rebuilt = delivery_from_ref(pickle.loads(pickle.dumps(delivery_ref(delivery))))
    broker.ack(rebuilt)
    assert broker.stats(["q"])[0].leased == 0
    for foreign in ((7, 12), "message-id", ("q",), (b"tag", "q")):
        stray = Delivery(delivery.envelope, "q", "token", "", "q", False, 1, foreign)
        with pytest.raises(BrokerError, match="not issued by a Redis broker"):
            broker.ack(stray)


def test_an_ack_leaves_an_entry_a_celery_worker_wrote_since_for_it_to_settle(
    connect: Callable[..., RedisBroker], raw: redis.Redis, prefix: str
) -> None:
    broker = connect()
    broker.publish(envelope("taken twice"), exchange="", routing_key="q")
    [delivery] = broker.fetch(["q"], 1, timeout=0)
    tag = delivery.broker_data[0]
    ours = raw.hget(f"{prefix}unacked", tag)
    assert ours is not None
    # Our lease lapsed, a Celery worker restored the message and took it again: the
    # entry under the same tag is now the one it wrote (here written with another
    # spacing: another length).
    payload, exchange, routing_key = json.loads(ours)
    theirs = json.dumps([payload, exchange, routing_key], indent=1)
    assert len(theirs) != len(ours)
    raw.hset(f"{prefix}unacked", tag, theirs)
    broker.ack(delivery)
    assert broker.stats(["q"])[0].leased == 0  # our lease is settled
    assert raw.hget(f"{prefix}unacked", tag) == theirs.encode()  # theirs is not
    assert raw.zscore(f"{prefix}unacked_index", tag) is not None
