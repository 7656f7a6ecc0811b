"""The estimate of a message's header size, made on every AMQP publish, gives what its
plain recursive definition gives, and refuses the same values with the same words."""

from __future__ import annotations

import datetime
import decimal
import random
from collections.abc import Mapping
from typing import Any

import pytest

from conveyor.brokers.amqp_message import _estimate
from conveyor.errors import EncodeError

INT64 = 2**63


def defined_size(value: Any, depth: int = 0, path: str = "") -> int:
    """The estimate as first written: one call per value, no shortcut."""
    if isinstance(value, str):
        return len(value) + 6
    if value is None or isinstance(value, (bool, float, decimal.Decimal, datetime.datetime)):
        return 10
    if isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise EncodeError(f"headers{path}: {value} does not fit in a 64-bit AMQP integer")
        return 10
    if depth > 32:
        raise EncodeError(f"headers{path}: nested too deeply to be sent over AMQP")
    if isinstance(value, Mapping):
        total = 6
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodeError(
                    f"headers{path}: header names are strings, not {type(key).__name__}")
            total += len(key) + 2 + defined_size(item, depth + 1, f"{path}[{key!r}]")
        return total
    if isinstance(value, (list, tuple)):
        return 6 + sum(defined_size(item, depth + 1, path) for item in value)
    if isinstance(value, (bytes, bytearray)):
        return len(value) // 4 + 6
    raise EncodeError(
        f"headers{path}: a {type(value).__name__} cannot be sent as an AMQP header value")


def random_value(rng: random.Random, depth: int) -> Any:
    leaves: list[Any] = [
        None, True, False, 0, -7, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 1.5,
        decimal.Decimal("1.25"), datetime.datetime(2026, 11, 24), "", "é ✓", "x" * 40,
        b"raw", bytearray(b"ab"), object(), {1, 2},
    ]
    if depth >= 4 or rng.random() < 0.7:
        return rng.choice(leaves)
    kind = rng.choice([list, tuple, dict])
    if kind is dict:
        return random_headers(rng, depth + 1)
    return kind(random_value(rng, depth + 1) for _ in range(rng.randint(0, 4)))


def random_headers(rng: random.Random, depth: int = 0) -> dict[Any, Any]:
    keys: list[Any] = ["id", "task", "timelimit", "stamps", "é", "k" * 20]
    if rng.random() < 0.05:
        keys.append(3)  # not a string: refused
    return {rng.choice(keys): random_value(rng, depth) for _ in range(rng.randint(0, 6))}


def outcome(estimate: Any, headers: dict[Any, Any]) -> int | str:
    try:
        return int(estimate(headers))
    except EncodeError as exc:
        return str(exc)


@pytest.mark.parametrize("seed", range(20))
def test_the_estimate_is_its_definition(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        headers = random_headers(rng)
        assert outcome(lambda h: _estimate(h, "headers"), headers) == outcome(
            defined_size, headers), headers


@pytest.mark.parametrize("headers", [
    {"timelimit": [None, 2**64]},
    {"timelimit": (1.5, -(2**63) - 1)},
    {"stamps": {"a": [2**63]}},
    {"retries": 2**63},
    {"group": object()},
    {"nested": [["x", {"deeper": {1, 2}}]]},
])
def test_a_value_amqp_cannot_carry_is_refused_wherever_it_is(headers: dict[str, Any]) -> None:
    refused = outcome(lambda h: _estimate(h, "headers"), headers)
    assert isinstance(refused, str)
    assert refused == outcome(defined_size, headers)


def test_values_nested_too_deeply_are_refused_with_where_they_are() -> None:
    deep: Any = "leaf"
    for _ in range(40):
        deep = [deep]
    headers = {"outer": {"inner": deep}}
    assert outcome(lambda h: _estimate(h, "headers"), headers) == outcome(defined_size, headers)
    with pytest.raises(EncodeError, match=r"\['outer'\]\['inner'\]: nested too deeply"):
        _estimate(headers, "headers")
