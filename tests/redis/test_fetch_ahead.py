"""A fetch sent ahead on Redis: its messages are leased at once and read later, or given
back by id if nobody reads them (their process died)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.redis.conftest import PrivateRedis, ProcessWorker, start_conveyor_worker
from tests.redis.conveyor_app import make_app
from tests.redis.monitoring import monitored
from tests.redis.scratch import ScratchRedisBroker

import redis
from conveyor import Queue
from conveyor.brokers.base import RidingAcks
from conveyor.brokers.redis import RedisBroker
from conveyor.canvas import group
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import BrokerError

QUEUE = "ahead"


@pytest.fixture
def connect(redis_url: str, prefix: str) -> Iterator[Callable[..., RedisBroker]]:
    opened: list[RedisBroker] = []

    def open_broker(**options: Any) -> RedisBroker:
        broker = ScratchRedisBroker(redis_url, global_keyprefix=prefix, **options)
        broker.declare_queue(Queue(QUEUE))
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


def publish(broker: RedisBroker, *bodies: str) -> None:
    for body in bodies:
        envelope = Envelope(body.encode(), "application/json", "utf-8", {"task": "t"}, {})
        broker.publish(envelope, exchange="", routing_key=QUEUE)


def bodies(deliveries: list[Any]) -> list[str]:
    return [delivery.envelope.body.decode() for delivery in deliveries]


def counts(broker: RedisBroker) -> tuple[int, int]:
    (stats,) = broker.stats([QUEUE])
    return stats.ready, stats.leased


def test_a_fetch_sent_ahead_leases_at_once_and_is_read_by_the_next_fetch(
        connect: Callable[..., RedisBroker]) -> None:
    broker = connect()
    publish(broker, "1", "2", "3")
    noted: list[str] = []
    assert broker.fetch_ahead([QUEUE], 2, noted.append)
    (fetch_id,) = noted
    assert fetch_id
    assert not broker.fetch_ahead([QUEUE], 2, noted.append)  # one at a time
    assert len(noted) == 1
    assert counts(connect()) == (1, 2)  # taken before anyone read the reply
    deliveries = broker.fetch([QUEUE], 2, timeout=0)
    assert bodies(deliveries) == ["1", "2"]
    assert all(d.tag.startswith(fetch_id) for d in deliveries)
    assert broker.take_ahead() == []  # read once
    broker.ack_many(deliveries)
    assert bodies(broker.fetch([QUEUE], 5, timeout=0)) == ["3"]


def test_an_unread_fetch_is_given_back_by_its_id_and_nothing_else(
        connect: Callable[..., RedisBroker]) -> None:
    holder, dead, settler = connect(), connect(), connect()
    publish(holder, "1", "2", "3", "4")
    kept = holder.fetch([QUEUE], 1, timeout=0)
    noted: list[str] = []
    assert dead.fetch_ahead([QUEUE], 2, noted.append)
    assert counts(settler) == (1, 3)
    # Its process dies here: nobody reads the reply.
    assert settler.release_unread([QUEUE], noted[0]) == 2
    assert settler.release_unread([QUEUE], noted[0]) == 0  # once only
    assert counts(settler) == (3, 1)  # the other holder keeps its message
    # Back at the head of the queue, where they were taken from.
    assert bodies(settler.fetch([QUEUE], 3, timeout=0)) == ["2", "3", "4"]
    holder.ack_many(kept)
    assert counts(settler) == (0, 3)


def test_a_fetch_ahead_that_redis_did_not_know_takes_nothing(
        connect: Callable[..., RedisBroker], raw: redis.Redis) -> None:
    broker = connect()
    publish(broker, "1")
    raw.script_flush()
    assert broker.fetch_ahead([QUEUE], 1, lambda _: None)
    assert broker.take_ahead() == []  # NOSCRIPT: the script did not run
    assert counts(broker) == (1, 0)
    assert bodies(broker.fetch([QUEUE], 1, timeout=0)) == ["1"]  # which loads it again


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_a_fetch_whose_reply_was_lost_gives_back_what_it_took(
        connect: Callable[..., RedisBroker]) -> None:
    broker = connect()
    publish(broker, "1", "2", "3")
    assert broker.fetch_ahead([QUEUE], 2, lambda _: None)
    assert counts(broker) == (1, 2)  # the script ran
    # The reply is lost as a connection dying at that moment loses it: the reply always
    # arrives before a server-side kill could, so the connection is cut on this side.
    pending = broker._ahead
    assert pending is not None
    pending.connection.disconnect()
    assert broker.take_ahead() == []
    assert counts(broker) == (3, 0)  # back now, not when the leases lapse in an hour
    assert bodies(broker.fetch([QUEUE], 3, timeout=0)) == ["1", "2", "3"]


def test_the_connection_of_fetches_sent_ahead_opens_again_after_a_failure(
        connect: Callable[..., RedisBroker], redis_url: str) -> None:
    broker = connect()
    publish(broker, "1", "2", "3")
    assert broker.fetch_ahead([QUEUE], 1, lambda _: None)
    assert bodies(broker.take_ahead()) == ["1"]
    pending_on = broker._ahead_connection
    assert pending_on is not None
    pending_on.send_command("CLIENT", "ID")
    connection_id = pending_on.read_response()
    killer = redis.Redis.from_url(redis_url)
    try:
        killer.client_kill_filter(_id=connection_id)
    finally:
        killer.close()
    # The next send finds the connection dead (or Redis closes it under the reply):
    # either way nothing is lost, and the one after that works on a new connection.
    first = broker.fetch_ahead([QUEUE], 1, lambda _: None) and broker.take_ahead()
    assert broker.fetch_ahead([QUEUE], 1, lambda _: None)
    second = broker.take_ahead()
    rest = broker.fetch([QUEUE], 3, timeout=0)
    assert sorted(bodies([*(first or []), *second, *rest])) == ["2", "3"]


def test_a_fetch_ahead_whose_connection_fails_as_it_is_sent_gives_back_what_it_took(
        connect: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch) -> None:
    import conveyor.brokers.redis as redis_broker

    broker = connect()
    publish(broker, "1", "2", "3")
    real_send = redis_broker.send

    def send_then_fail(connection: Any, args: tuple[Any, ...]) -> None:
        # The bytes went out and Redis ran the script; the error comes as the socket dies.
        real_send(connection, args)
        connection.read_response()
        raise redis.ConnectionError("connection reset while sending")

    monkeypatch.setattr(redis_broker, "send", send_then_fail)
    assert not broker.fetch_ahead([QUEUE], 2, lambda _: None)
    monkeypatch.setattr(redis_broker, "send", real_send)
    assert counts(broker) == (3, 0)  # back now, not when the leases lapse in an hour
    assert bodies(broker.fetch([QUEUE], 3, timeout=0)) == ["1", "2", "3"]


class Riders:
    """Acks handed to a fetch sent ahead, and what the broker said of them."""

    def __init__(self, deliveries: list[Delivery]) -> None:
        self.outcomes: list[bool] = []
        self.acks = RidingAcks(deliveries, self.outcomes.append)


def test_acks_riding_a_fetch_sent_ahead_are_applied_when_its_reply_is_read(
        connect: Callable[..., RedisBroker], redis_url: str) -> None:
    broker = connect()
    publish(broker, "0", "1", "2", "3", "4")
    broker.ack_many(broker.fetch([QUEUE], 1, timeout=0))  # Redis knows both scripts now
    held = broker.fetch([QUEUE], 2, timeout=0)
    riders = Riders(held)
    with counted_scripts(redis_url) as sent:
        assert broker.fetch_ahead([QUEUE], 2, lambda _: None, riders.acks)
        assert riders.outcomes == []  # nobody has read the reply yet
        assert bodies(broker.take_ahead()) == ["3", "4"]
    assert riders.outcomes == [True]
    assert counts(broker) == (0, 2)  # only what the fetch took is still leased
    assert sent == ["ACK", "FETCH"]  # the acks first, in the same write
    assert bodies(broker.fetch([QUEUE], 5, timeout=0)) == []


def test_riding_acks_that_redis_did_not_run_go_back_to_their_sender(
        connect: Callable[..., RedisBroker], raw: redis.Redis) -> None:
    broker = connect()
    publish(broker, "1", "2")
    held = broker.fetch([QUEUE], 1, timeout=0)
    raw.script_flush()
    riders = Riders(held)
    assert broker.fetch_ahead([QUEUE], 1, lambda _: None, riders.acks)
    assert broker.take_ahead() == []  # NOSCRIPT for both
    assert riders.outcomes == [False]
    assert counts(broker) == (1, 1)  # the held message waits for its ack the usual way
    broker.ack_many(held)
    assert counts(broker) == (1, 0)


def test_riding_acks_whose_reply_was_lost_go_back_to_their_sender(
        connect: Callable[..., RedisBroker]) -> None:
    broker = connect()
    publish(broker, "1", "2", "3")
    held = broker.fetch([QUEUE], 1, timeout=0)
    riders = Riders(held)
    assert broker.fetch_ahead([QUEUE], 2, lambda _: None, riders.acks)
    pending = broker._ahead
    assert pending is not None
    pending.connection.disconnect()
    assert broker.take_ahead() == []
    assert riders.outcomes == [False]  # they did arrive, but nobody can know it
    assert counts(broker) == (2, 0)  # the fetch gave back what it took
    broker.ack_many(held)  # sent again the usual way: harmless
    assert counts(broker) == (2, 0)


def test_riding_acks_this_broker_did_not_issue_send_nothing(
        connect: Callable[..., RedisBroker]) -> None:
    broker = connect()
    publish(broker, "1")
    foreign = Delivery(envelope=Envelope(b"x", "application/json", "utf-8", {}, {}),
                       queue=QUEUE, tag="t", broker_data=None)
    riders = Riders([foreign])
    assert not broker.fetch_ahead([QUEUE], 1, lambda _: None, riders.acks)
    assert riders.outcomes == []  # still the caller's: the usual way says what is wrong
    assert counts(broker) == (1, 0)
    with pytest.raises(BrokerError):
        broker.ack_many(riders.acks.deliveries)


@contextmanager
def counted_scripts(url: str) -> Iterator[list[str]]:
    """The broker's scripts as Redis ran them meanwhile, by name."""
    sent: list[str] = []
    with monitored(url) as seen:
        yield sent
    sent += [what for _, what in seen if what in ("ACK", "FETCH", "script")]


def test_a_prefork_worker_sends_its_acks_with_its_fetches_and_settles_everything(
        private_redis: PrivateRedis, tmp_path: Path, processes: list[ProcessWorker]) -> None:
    env = {**os.environ, "INTEROP_REDIS_URL": private_redis.url, "INTEROP_PREFIX": "ride:"}
    worker = start_conveyor_worker(env, tmp_path / "w.log", "-P", "prefork", "-c", "1",
                                   "--prefetch-multiplier", "4")
    processes.append(worker)
    options = {"global_keyprefix": "ride:"}
    app = make_app(broker_url=private_redis.url, result_backend=private_redis.url,
                   broker_transport_options=options, result_backend_transport_options=options)
    count = 200
    try:
        add = app.tasks["interop.add"]
        assert add.delay(1, 2).get(timeout=30) == 3  # up and idle
        with monitored(private_redis.url) as seen:
            calls = group(add.s(n, 1) for n in range(count)).apply_async()
            assert calls.get(timeout=60) == [n + 1 for n in range(count)]
            time.sleep(0.3)  # the last acks' linger
        broker = ScratchRedisBroker(private_redis.url, global_keyprefix="ride:")
        try:
            (stats,) = broker.stats(["celery"])
        finally:
            broker.close()
    finally:
        app.close()
    assert worker.stop() == 0, worker.text()
    assert (stats.ready, stats.leased) == (0, 0)  # every message acked, ridden or not
    # Acks that ride reach Redis in the fetch's write: the fetch runs right after them,
    # before any other client's command. About one fetch in four messages (a window of
    # four) is sent ahead, each with at least the ack of the job that sends it.
    rides = sum(1 for before, after in itertools.pairwise(seen)
                if before[1] == "ACK" and after == (before[0], "FETCH"))
    assert rides >= 10, (rides, seen[:40])
