"""A fetch sent ahead on Redis: its messages are leased at once and read later, or given
back by id if nobody reads them (their process died)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.redis.scratch import ScratchRedisBroker

import redis
from conveyor import Queue
from conveyor.brokers.redis import RedisBroker
from conveyor.envelope import Envelope

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
