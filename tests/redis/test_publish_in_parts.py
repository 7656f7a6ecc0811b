"""A batch bigger than ``PUBLISH_PART`` goes to Redis as one transaction written in
parts: all of it or nothing, in order, once."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from tests.redis.scratch import ScratchRedisBroker

from conveyor.brokers.redis import PUBLISH_PART, RedisBroker
from conveyor.envelope import Envelope
from conveyor.errors import EncodeError

BIG = 2 * PUBLISH_PART + 7  # three parts, the last one short


@pytest.fixture
def broker(redis_url: str, prefix: str) -> Iterator[RedisBroker]:
    instance = ScratchRedisBroker(redis_url, global_keyprefix=prefix)
    yield instance
    instance.close()


def envelope(body: str, **headers: Any) -> Envelope:
    return Envelope(body.encode(), "application/json", "utf-8", {"task": "t", **headers},
                    {"priority": 0})


def batch(count: int = BIG) -> list[tuple[Envelope, str, str]]:
    return [(envelope(str(n)), "", "q") for n in range(count)]


def drain(broker: RedisBroker, queue: str) -> list[str]:
    bodies: list[str] = []
    while deliveries := broker.fetch([queue], 100, timeout=0):
        bodies += [delivery.envelope.body.decode() for delivery in deliveries]
        broker.ack_many(deliveries)
    return bodies


def test_a_batch_of_several_parts_arrives_whole_and_in_order(broker: RedisBroker) -> None:
    broker.publish_many(batch())
    assert drain(broker, "q") == [str(n) for n in range(BIG)]


def test_a_message_that_cannot_be_written_in_the_last_part_sends_none(
    broker: RedisBroker,
) -> None:
    items = batch()
    items[-1] = (envelope("bad", **{"not json": {1, 2}}), "", "q")
    with pytest.raises(EncodeError, match="headers"):
        broker.publish_many(items)
    assert drain(broker, "q") == []
    # The connection the parts went out on is not handed on half-way through a transaction.
    broker.publish(envelope("after"), exchange="", routing_key="q")
    assert drain(broker, "q") == ["after"]


def test_a_connection_lost_between_parts_sends_the_batch_once(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_commands = broker._publish_commands
    parts: list[int] = []

    def cut_after_the_first_part(items: Any, delay: float | None) -> Any:
        parts.append(len(items))
        if len(parts) == 2:  # the first part is written: its connection breaks now
            pool: Any = broker.client.connection_pool
            for connection in pool._in_use_connections:
                connection._sock.shutdown(socket.SHUT_RDWR)
        return make_commands(items, delay)

    monkeypatch.setattr(broker, "_publish_commands", cut_after_the_first_part)
    broker.publish_many(batch())
    # Two parts made before the loss, then the whole batch again, the usual way.
    assert parts == [PUBLISH_PART, PUBLISH_PART, BIG]
    assert drain(broker, "q") == [str(n) for n in range(BIG)]
