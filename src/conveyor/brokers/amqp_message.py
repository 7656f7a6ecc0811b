"""Envelopes to AMQP messages and back, as py-amqp (and so Celery) writes them.

Headers keep their types on the wire (py-amqp: str ``S``, bool ``t``, int ``I``/``L``,
float ``d``, None ``V``, dict ``F``, list ``A``), so a Celery peer reads exactly what a
Celery producer would have written. All headers of a message travel in one content-header
frame: headers bigger than RabbitMQ's ``frame_max`` would make it close the connection
(``FRAME_ERROR``), so such a message is refused here, before it is sent.
"""

from __future__ import annotations

import datetime
import decimal
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import amqp  # type: ignore[import-untyped]
from conveyor.brokers.amqp_delay import strip_chain_headers
from conveyor.brokers.amqp_properties import encode_properties
from conveyor.brokers.virtual import DeadLetter
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import EncodeError

PROPERTY_NAMES = frozenset(
    {
        "correlation_id",
        "reply_to",
        "delivery_mode",
        "priority",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
        "cluster_id",
    }
)
"""The AMQP basic properties; other keys of ``Envelope.properties`` (what other brokers
keep there) are not sent."""

PERSISTENT = 2
FRAME_OVERHEAD = 1024
_INT64 = 2**63


class _Message(amqp.Message):  # type: ignore[misc]  # py-amqp is untyped
    """py-amqp's message, with its content header's properties written by
    :mod:`conveyor.brokers.amqp_properties` (the same bytes, sooner)."""

    def _serialize_properties(self) -> bytes:
        fast = encode_properties(self.properties)
        return fast if fast is not None else bytes(super()._serialize_properties())


def build_message(
    envelope: Envelope,
    *,
    frame_max: int,
    extra_headers: Mapping[str, Any] | None = None,
    per_message_ttl: bool = False,
) -> tuple[Any, int]:
    """The py-amqp message for an envelope, and the bytes it will take in the outbox.

    A task message's ``expiration`` (the per-message TTL Celery derives from ``expires``)
    is not sent unless ``per_message_ttl``: RabbitMQ would drop the message unseen once
    it expires, so no REVOKED state is stored and a chord waiting for it never finishes.
    The ``expires`` header is enough for every worker, Celery's included.
    """
    headers = dict(envelope.headers)
    if extra_headers:
        headers.update(extra_headers)
    properties: dict[str, Any] = {
        key: value
        for key, value in envelope.properties.items()
        if key in PROPERTY_NAMES and value is not None
    }
    if not per_message_ttl and headers.get("expires") is not None:
        properties.pop("expiration", None)
    properties.setdefault("delivery_mode", PERSISTENT)
    if "expiration" in properties:
        properties["expiration"] = str(properties["expiration"])
    estimate = _estimate(headers, "headers")
    message = _Message(
        envelope.body,
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        application_headers=headers,
        **properties,
    )
    if estimate * 4 > frame_max // 2:
        _check_frame(message, frame_max)
    return message, len(envelope.body) + estimate + 64


def envelope_of(message: Any, chain_prefixes: tuple[str, ...]) -> Envelope:
    """The envelope of a received message (the delay chain's bookkeeping removed)."""
    properties = dict(message.properties)
    content_type = properties.pop("content_type", None) or ""
    content_encoding = properties.pop("content_encoding", None) or ""
    headers = properties.pop("application_headers", None) or {}
    if not isinstance(headers, dict):
        headers = {}
    if "x-death" in headers or "x-first-death-queue" in headers:
        strip_chain_headers(headers, chain_prefixes)
    body = message.body
    if isinstance(body, str):  # never with our channels (auto_decode off); be safe
        body = body.encode(content_encoding or "utf-8")
    return Envelope(
        bytes(body),
        str(content_type),
        str(content_encoding),
        headers,
        {key: value for key, value in properties.items() if value is not None},
    )


def _check_frame(message: Any, frame_max: int) -> None:
    try:
        size = len(message._serialize_properties())
    except Exception as exc:  # py-amqp raises several types for bad values
        raise EncodeError(f"message headers cannot be sent over AMQP: {exc}") from exc
    if size + FRAME_OVERHEAD > frame_max:
        raise EncodeError(
            f"message headers take {size} bytes, more than RabbitMQ's frame_max "
            f"({frame_max}): keep header values (argsrepr, kwargsrepr) short"
        )


_SMALL = (bool, float, decimal.Decimal, datetime.datetime)


class _Unsendable(Exception):
    """A header value py-amqp can't encode; ``path`` grows while the error unwinds."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = ""


def _estimate(headers: Mapping[str, Any], where: str) -> int:
    """An upper bound of the headers' encoded size in characters; raises EncodeError for
    values AMQP can't carry (this runs on every publish: no work unless something's wrong)."""
    try:
        return _size(headers, 0)
    except _Unsendable as exc:
        raise EncodeError(f"{where}{exc.path}: {exc.problem}") from None


def _size(value: Any, depth: int) -> int:
    if isinstance(value, str):
        return len(value) + 6
    if value is None or isinstance(value, _SMALL):
        return 10
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise _Unsendable(f"{value} does not fit in a 64-bit AMQP integer")
        return 10
    if depth > 32:
        raise _Unsendable("nested too deeply to be sent over AMQP")
    if isinstance(value, (list, tuple)):  # before the (slower) check of an abstract class
        total = 6
        for item in value:
            kind = type(item)
            if item is None or kind is bool or kind is float:
                total += 10
            elif kind is str:
                total += len(item) + 6
            else:
                total += _size(item, depth + 1)
        return total
    if isinstance(value, Mapping):
        total = 6
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise _Unsendable(f"header names are strings, not {type(key).__name__}")
            # What the branches above give, without a call, for a task message's usual
            # values: the calls took most of the estimate's time.
            kind = type(item)
            if kind is str:
                total += len(key) + 8 + len(item)
            elif item is None or kind is bool or (kind is int and -_INT64 <= item < _INT64):
                total += len(key) + 12
            else:
                try:
                    total += len(key) + 2 + _size(item, depth + 1)
                except _Unsendable as exc:
                    exc.path = f"[{key!r}]{exc.path}"
                    raise
        return total
    if isinstance(value, (bytes, bytearray)):
        return len(value) // 4 + 6  # counted once: the caller multiplies by 4
    raise _Unsendable(f"a {type(value).__name__} cannot be sent as an AMQP header value")


class _ReplyAddresses:
    """Where the result of each task received here goes (``reply_to``, ``correlation_id``).

    The worker stores some states outside the task's run (refused, expired, lost worker):
    the rpc:// backend finds the caller's queue here, from the delivery the broker saw.
    Bounded: only recent deliveries are remembered.
    """

    def __init__(self, size: int = 20_000) -> None:
        self._addresses: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def remember(self, envelope: Envelope) -> None:
        reply_to = envelope.properties.get("reply_to")
        task_id = envelope.headers.get("id")
        if not reply_to or not isinstance(task_id, str):
            return
        correlation_id = str(envelope.properties.get("correlation_id") or task_id)
        with self._lock:
            self._addresses[task_id] = (str(reply_to), correlation_id)
            self._addresses.move_to_end(task_id)
            if len(self._addresses) > self._size:
                self._addresses.popitem(last=False)

    def get(self, task_id: str) -> tuple[str, str] | None:
        with self._lock:
            return self._addresses.get(task_id)


REPLY_ADDRESSES = _ReplyAddresses()


def reply_address(task_id: str) -> tuple[str, str] | None:
    return REPLY_ADDRESSES.get(task_id)


DEAD_HEADERS = ("reason", "queue", "exchange", "routing-key", "deliveries", "at")


def dead_letter_headers(delivery: Delivery, reason: str) -> dict[str, Any]:
    """What a dead letter carries besides the original message (``x-conveyor-dead-*``)."""
    values = (
        reason,
        delivery.queue,
        delivery.exchange,
        delivery.routing_key,
        delivery.delivery_count,
        time.time(),
    )
    return {
        f"x-conveyor-dead-{name}": value for name, value in zip(DEAD_HEADERS, values, strict=True)
    }


def dead_letter_of(message: Any, queue: str, chain_prefixes: tuple[str, ...]) -> DeadLetter:
    envelope = envelope_of(message, chain_prefixes)
    found = {name: envelope.headers.pop(f"x-conveyor-dead-{name}", None) for name in DEAD_HEADERS}
    return DeadLetter(
        envelope,
        str(found["queue"] or queue),
        str(found["exchange"] or ""),
        str(found["routing-key"] or ""),
        int(found["deliveries"] or 1),
        str(found["reason"] or ""),
        float(found["at"] or 0.0),
    )
