"""The content header's properties are py-amqp's bytes, exactly, whatever the message."""

from __future__ import annotations

import datetime
import decimal
import random
from typing import Any

import pytest

import amqp  # type: ignore[import-untyped]
from conveyor.brokers.amqp_message import build_message
from conveyor.brokers.amqp_properties import encode_properties
from conveyor.envelope import Envelope


def reference(properties: dict[str, Any]) -> bytes:
    return bytes(amqp.Message(b"", **properties)._serialize_properties())


def task_headers(task_id: str) -> dict[str, Any]:
    return {
        "lang": "py", "task": "proj.tasks.add", "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "gen1@host",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None,
        "stamps": {},
    }


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [
        None, True, False, 0, 1, -1, 2147483647, -2147483647, 2147483648, -2147483648,
        2**62, rng.randint(-(2**40), 2**40), rng.random() * 1e6, -0.5, "", "é ✓ 𝄞",
        "x" * rng.randint(0, 300), b"raw\x00bytes",
    ]
    if depth < 3:
        choices += [
            [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
            tuple(random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))),
            {f"k{n}": random_value(rng, depth + 1) for n in range(rng.randint(0, 4))},
        ]
    return rng.choice(choices)


def test_a_task_message_is_written_exactly_as_py_amqp_writes_it() -> None:
    for task_id in ("a" * 36, "0f2c6e7a-6d0c-4cc4-9d0e-2f6b1a3c7d11"):
        properties = {
            "content_type": "application/json", "content_encoding": "utf-8",
            "application_headers": task_headers(task_id), "delivery_mode": 2,
            "priority": 0, "correlation_id": task_id, "reply_to": "c1b2-reply",
        }
        assert encode_properties(properties) == reference(properties)


def test_random_headers_and_properties_match_py_amqp_byte_for_byte() -> None:
    rng = random.Random(20261124)
    optional = {
        "delivery_mode": lambda: rng.choice([1, 2]),
        "priority": lambda: rng.randint(0, 255),
        "correlation_id": lambda: rng.choice(["", "id-1", "ü" * 40]),
        "reply_to": lambda: "reply.queue",
        "expiration": lambda: str(rng.randint(1, 10**6)),
        "message_id": lambda: "m-1",
        "timestamp": lambda: rng.randint(0, 2**40),
        "type": lambda: "t",
        "user_id": lambda: "guest",
        "app_id": lambda: "app",
        "cluster_id": lambda: "c",
    }
    for _ in range(500):
        properties: dict[str, Any] = {
            "content_type": rng.choice(["application/json", "application/x-msgpack"]),
            "content_encoding": rng.choice(["utf-8", "binary"]),
            "application_headers": {
                f"h{n}": random_value(rng) for n in range(rng.randint(0, 25))
            },
        }
        for name in rng.sample(sorted(optional), rng.randint(0, len(optional))):
            properties[name] = optional[name]()
        assert encode_properties(properties) == reference(properties), properties


@pytest.mark.parametrize(
    "headers",
    [
        {"when": datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)},
        {"amount": decimal.Decimal("1.25")},
        {"nested": {"deeper": [decimal.Decimal("2.5")]}},
    ],
)
def test_values_it_does_not_write_are_left_to_py_amqp(headers: dict[Any, Any]) -> None:
    properties = {"content_type": "application/json", "application_headers": headers}
    assert encode_properties(properties) is None
    envelope = Envelope(b"{}", "application/json", "utf-8", headers, {})
    message, _ = build_message(envelope, frame_max=131072)
    assert message._serialize_properties() == reference(
        {**properties, "content_encoding": "utf-8", "delivery_mode": 2}
    )


def test_an_unknown_property_or_a_key_that_is_not_text_is_left_to_py_amqp() -> None:
    assert encode_properties({"content_type": "a", "headers": {}}) is None
    assert encode_properties({"application_headers": {b"raw": 1}}) is None


def test_the_messages_the_broker_sends_use_the_fast_writer() -> None:
    envelope = Envelope(b"[[1, 2], {}, {}]", "application/json", "utf-8",
                        task_headers("b" * 36), {"correlation_id": "b" * 36, "priority": 0})
    message, _ = build_message(envelope, frame_max=131072)
    expected = encode_properties(message.properties)
    assert expected is not None
    assert message._serialize_properties() == expected == reference(message.properties)
