"""The envelope: what a broker carries, apart from what the message means.

A broker stores and moves envelopes; it never decodes a body. ``properties`` hold the
AMQP basic properties Celery sets (``correlation_id``, ``reply_to``, ``delivery_mode``,
``priority``, ``expiration``); ``headers`` the application headers, where protocol v2
keeps all task metadata.

``headers_json``, when set, is ``headers`` already written as ``json.dumps`` writes it
(the producer renders the headers of common task messages from templates, which is
cheaper); brokers that store headers as JSON (Redis) use it instead of encoding them
again. Only the producer sets it, on an envelope it has just made: code that changes
``headers`` must not pass it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Envelope:
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    headers_json: str | None = field(default=None, compare=False, repr=False)

    @property
    def priority(self) -> int:
        value = self.properties.get("priority")
        return int(value) if isinstance(value, (int, float)) else 0


_new = object.__new__
_slot = vars(Envelope)  # the fields' slot descriptors
_set_body = _slot["body"].__set__
_set_content_type = _slot["content_type"].__set__
_set_content_encoding = _slot["content_encoding"].__set__
_set_headers = _slot["headers"].__set__
_set_properties = _slot["properties"].__set__
_set_headers_json = _slot["headers_json"].__set__


def new_envelope(
    body: bytes,
    content_type: str,
    content_encoding: str,
    headers: dict[str, Any],
    properties: dict[str, Any],
    headers_json: str | None,
) -> Envelope:
    """``Envelope(...)`` with every field given, in half the time of the generated
    ``__init__`` (the producer makes one per message)."""
    envelope: Envelope = _new(Envelope)
    _set_body(envelope, body)
    _set_content_type(envelope, content_type)
    _set_content_encoding(envelope, content_encoding)
    _set_headers(envelope, headers)
    _set_properties(envelope, properties)
    _set_headers_json(envelope, headers_json)
    return envelope


@dataclass(slots=True)
class Delivery:
    """One envelope handed to a consumer, leased until it is acked or rejected.

    ``tag`` identifies the lease to the broker that issued it. ``delivery_count`` is 1 on
    the first delivery and grows each time a lapsed lease or a requeue brings it back.
    """

    envelope: Envelope
    queue: str
    tag: str
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    delivery_count: int = 1
    broker_data: Any = None

    @property
    def delivery_info(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "priority": self.envelope.priority,
            "redelivered": self.redelivered,
        }
