"""The envelope: what a broker carries, apart from what the message means.

A broker stores and moves envelopes; it never decodes a body. ``properties`` hold the
AMQP basic properties Celery sets (``correlation_id``, ``reply_to``, ``delivery_mode``,
``priority``, ``expiration``); ``headers`` the application headers, where protocol v2
keeps all task metadata.
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

    @property
    def priority(self) -> int:
        value = self.properties.get("priority")
        return int(value) if isinstance(value, (int, float)) else 0


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
