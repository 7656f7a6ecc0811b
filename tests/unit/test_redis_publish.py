"""The Redis broker's publish path writes kombu's envelope exactly (no server needed)."""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor.brokers.redis import RedisBroker, delivery_info_json, kombu_json
from conveyor.brokers.redis_layout import encode_envelope
from conveyor.envelope import Envelope
from conveyor.errors import BrokerUnavailable
from conveyor.protocol import CallTemplate

KEYS = ["", "celery", "quêue", "a.b.c", 'quo"te']


def random_envelope(rng: random.Random) -> Envelope:
    template = CallTemplate(rng.choice(["proj.add", "prój.x"]),
                            ignore_result=rng.choice([None, True]),
                            time_limit=rng.choice([None, 5, 1.5]))
    args = rng.choice([(), (1, "é"), ([None, True, 2.5],)])
    kwargs = rng.choice([None, {}, {"k": "🎉"}])
    return template.encode(
        str(uuid.uuid4()), args, kwargs, rng.choice([None, "g"]), rng.choice([None, 4]),
        None, rng.choice([None, "p"]), rng.choice(["", "reply"]), rng.choice([None, 0, 7]),
        rng.choice([1, 2]))


@pytest.mark.parametrize("seed", range(10))
def test_kombu_json_is_what_encode_envelope_writes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        envelope = random_envelope(rng)
        exchange, key, tag = rng.choice(KEYS), rng.choice(KEYS), str(uuid.uuid4())
        body = base64.b64encode(envelope.body).decode()
        got = kombu_json(envelope, body, delivery_info_json(exchange, key), tag)
        assert got == encode_envelope(envelope, exchange, key, tag)


@pytest.mark.parametrize("envelope", [
    Envelope(b"[]", "application/json", "utf-8", {"task": "x"}, {}),  # no headers_json
    Envelope(b"[]", "application/json", "utf-8", {"task": "x"},
             {"correlation_id": "i", "reply_to": "", "delivery_mode": 2, "priority": 0,
              "expiration": "1000"}, '{"task": "x"}'),
    Envelope(b"[]", "application/json", "utf-8", {"task": "x"},
             {"correlation_id": "i", "reply_to": None, "delivery_mode": 2, "priority": 0},
             '{"task": "x"}'),
])
def test_kombu_json_leaves_other_envelopes_to_encode_envelope(envelope: Envelope) -> None:
    assert kombu_json(envelope, "", delivery_info_json("", "q"), "tag") is None


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    instance = RedisBroker("redis://127.0.0.1:1/0")  # never connects in these tests
    yield instance
    instance.close()


def stored(payload: str) -> dict[str, Any]:
    document = json.loads(payload)
    assert isinstance(document, dict)
    return document


def test_a_batch_to_one_list_is_one_lpush_in_order(broker: RedisBroker) -> None:
    rng = random.Random(1)
    envelopes = [random_envelope(rng) for _ in range(20)]
    for envelope in envelopes:
        envelope.properties["priority"] = 0
    commands, fresh = broker._publish_commands([(e, "", "work") for e in envelopes], None)
    assert fresh == ["work"]
    assert [command[:2] for command in commands] == [["LPUSH", "work"], ["SADD",
                                                                         "_conveyor.queues"]]
    payloads = commands[0][2:]
    assert len(payloads) == len(envelopes)
    for envelope, payload in zip(envelopes, payloads, strict=True):
        tag = stored(payload)["properties"]["delivery_tag"]
        assert uuid.UUID(tag).version == 4
        assert payload == encode_envelope(envelope, "", "work", tag)


def test_runs_to_different_lists_stay_separate_and_ordered(broker: RedisBroker) -> None:
    rng = random.Random(2)
    plan = [("a", 0), ("a", 0), ("b", 0), ("a", 0), ("a", 9), ("a", 9)]
    items = []
    for queue, priority in plan:
        envelope = random_envelope(rng)
        envelope.properties["priority"] = priority
        items.append((envelope, "", queue))
    commands, _ = broker._publish_commands(items, None)
    shape = [(command[0], command[1], len(command) - 2) for command in commands[:-1]]
    assert shape == [("LPUSH", "a", 2), ("LPUSH", "b", 1), ("LPUSH", "a", 1),
                     ("LPUSH", "a\x06\x169", 2)]
    ids = [stored(p)["headers"]["id"] for command in commands[:-1] for p in command[2:]]
    assert ids == [envelope.headers["id"] for envelope, _, _ in items]


def test_general_envelopes_are_written_by_encode_envelope(broker: RedisBroker) -> None:
    envelope = Envelope(b"\x00binary", "application/x-python-serialize", "binary",
                        {"task": "x", "id": "1"}, {"priority": 0, "expiration": "5"})
    commands, _ = broker._publish_commands([(envelope, "", "q")], None)
    payload = commands[0][2]
    assert payload == encode_envelope(envelope, "", "q", stored(payload)["properties"][
        "delivery_tag"])


def test_delayed_messages_keep_time_ordered_tags(broker: RedisBroker) -> None:
    envelope = random_envelope(random.Random(3))
    commands, _ = broker._publish_commands([(envelope, "", "q"), (envelope, "", "q")], 30.0)
    zadds = [command for command in commands if command[0] == "ZADD"]
    assert len(zadds) == 2
    assert zadds[0][3] < zadds[1][3]  # ordered as sent
    assert not [command for command in commands if command[0] == "LPUSH"]


def test_redis_errors_are_translated(broker: RedisBroker) -> None:
    envelope = random_envelope(random.Random(4))
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        broker.publish(envelope, exchange="", routing_key="q")
    with pytest.raises(BrokerUnavailable):
        broker.publish_many([(envelope, "", "q"), (envelope, "", "r")])
