"""A broker that keeps what is published, and the general path to compare with."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from conveyor import Conveyor
from conveyor.envelope import Envelope
from conveyor.router import Target


class Capture:
    """A broker that keeps what is published."""

    def __init__(self) -> None:
        self.sent: list[tuple[Envelope, str, str, float | None]] = []
        self.declared: list[Any] = []

    def declare_exchange(self, exchange: Any) -> None:
        self.declared.append(exchange)

    def declare_queue(self, queue: Any) -> None:
        self.declared.append(queue)

    def publish(self, envelope: Envelope, *, exchange: str, routing_key: str,
                delay: float | None = None) -> None:
        self.sent.append((envelope, exchange, routing_key, delay))

    def publish_many(self, items: Sequence[tuple[Envelope, str, str]], *,
                     delay: float | None = None) -> None:
        for envelope, exchange, routing_key in items:
            self.sent.append((envelope, exchange, routing_key, delay))

    def close(self) -> None:
        pass


def make_app(**settings: Any) -> tuple[Conveyor, Capture]:
    app = Conveyor("proj", broker="memory://producer-tests", backend=None, **settings)
    capture = Capture()
    app._broker = capture  # type: ignore[assignment]
    return app, capture


def general(app: Conveyor, name: str, args: Any, kwargs: Any,
            options: dict[str, Any]) -> tuple[Envelope, Target]:
    """What the general path writes for a call (app.send_task before the lean path)."""
    producer = app.producer
    message = producer.build(name, args, kwargs, options)
    target = app.router.resolve(name, args, kwargs, options)
    if target.priority is not None and options.get("priority") is None:
        message = dataclasses.replace(message, priority=target.priority)
    return producer.encode(message, options), target


def assert_same(got: Envelope, expected: Envelope) -> None:
    assert got.body == expected.body
    assert (got.content_type, got.content_encoding) == (
        expected.content_type, expected.content_encoding)
    assert list(got.headers.items()) == list(expected.headers.items())
    assert list(got.properties.items()) == list(expected.properties.items())
    if got.headers_json is not None:
        assert got.headers_json == json.dumps(expected.headers)
