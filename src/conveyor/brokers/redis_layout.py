"""Where the Redis broker keeps things, and the JSON envelope in its lists.

Names shared with kombu's Redis transport (PROTOCOL.md section 3), so Celery clients
and Conveyor clients work on the same keys::

    <queue>, <queue>\\x06\\x16<step>      lists: LPUSH to publish, RPOP to take
    _kombu.binding.<exchange>            set of "<routing key>SEP<pattern>SEP<queue>"
    _kombu.binding_permanent.<exchange>  kombu 5.7's copy of the above
    unacked / unacked_index              hash tag -> [envelope, exchange, routing key]
                                         and zset tag -> time delivered or renewed
    unacked_mutex                        lock around restoring lapsed deliveries
    /<db>.<exchange>[/<routing key>]     pub/sub channel of a fanout exchange

Conveyor's own keys, which Celery never reads::

    _conveyor.deliveries                 hash tag -> {"n": count, "t": lease token,
                                         "q": list it came from, "l"/"s": lengths}
    _conveyor.leased.<queue>             zset tag -> time its lease lapses
    _conveyor.delayed.<queue>            zset tag -> time it becomes visible
    _conveyor.delayed_messages.<queue>   hash tag -> envelope, while delayed
    _conveyor.dead.<queue>               list of dead letters (newest first, capped)
    _conveyor.queues                     set of queue names (for stats())
    _conveyor.exchanges                  hash exchange -> type
    _conveyor.headers_bindings.<exch.>   set of JSON [queue, routing key, arguments]
    _conveyor.fanout.<exchange>          set of queues Conveyor consumes from a fanout

Every name, channels included, starts with the ``global_keyprefix`` transport option.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.envelope import Envelope
from conveyor.errors import ConfigurationError, EncodeError

SEP = "\x06\x16"
PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
TRANSPORT_PROPERTIES = ("body_encoding", "delivery_tag", "delivery_info")
"""Properties kombu's Redis transport adds to every envelope; not part of the message."""


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = ""
    sep: str = SEP
    steps: tuple[int, ...] = PRIORITY_STEPS
    db: int = 0
    fanout_prefix: str | bool = True
    fanout_patterns: bool = True
    unacked_name: str = "unacked"
    unacked_index_name: str = "unacked_index"
    unacked_mutex_name: str = "unacked_mutex"

    def __post_init__(self) -> None:
        if not self.steps or sorted(set(self.steps)) != list(self.steps) or self.steps[0] != 0:
            raise ConfigurationError(
                f"priority_steps must be ascending, distinct and start at 0: {self.steps}"
            )

    # -- priorities ------------------------------------------------------------------
    def step_of(self, priority: int) -> int:
        """Celery's mapping: the highest step not above the priority (0-9)."""
        priority = min(9, max(0, priority))
        return self.steps[bisect.bisect(self.steps, priority) - 1]

    def list_key(self, queue: str, step: int = 0) -> str:
        return f"{self.prefix}{queue}" if step == 0 else f"{self.prefix}{queue}{self.sep}{step}"

    def list_keys(self, queue: str) -> list[str]:
        return [self.list_key(queue, step) for step in self.steps]

    def fetch_order(self, queues: Sequence[str]) -> list[tuple[str, str]]:
        """``(queue, list key)`` in the order Celery serves them: step 0 first, then by
        queue (so on Redis, as in Celery, priority 0 is served before 9)."""
        return [(queue, self.list_key(queue, step)) for step in self.steps for queue in queues]

    # -- shared with kombu -----------------------------------------------------------
    @property
    def unacked(self) -> str:
        return self.prefix + self.unacked_name

    @property
    def unacked_index(self) -> str:
        return self.prefix + self.unacked_index_name

    @property
    def unacked_mutex(self) -> str:
        return self.prefix + self.unacked_mutex_name

    def binding_set(self, exchange: str) -> str:
        return f"{self.prefix}_kombu.binding.{exchange}"

    def permanent_binding_set(self, exchange: str) -> str:
        return f"{self.prefix}_kombu.binding_permanent.{exchange}"

    def binding_member(self, routing_key: str, pattern: str, queue: str) -> str:
        return self.sep.join([routing_key, pattern, queue])

    def parse_binding_member(self, member: str) -> tuple[str, str, str] | None:
        parts = member.split(self.sep)
        return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None

    def fanout_channel(self, exchange: str, routing_key: str = "") -> str:
        if self.fanout_prefix is True:
            start = f"/{self.db}."
        elif self.fanout_prefix is False:
            start = ""
        else:
            start = str(self.fanout_prefix)
        channel = f"{self.prefix}{start}{exchange}"
        if routing_key and self.fanout_patterns:
            channel += f"/{routing_key}"
        return channel

    def fanout_subscriptions(self, exchange: str) -> tuple[str, str]:
        """The PSUBSCRIBE patterns that hear every publish to a fanout exchange: kombu
        publishes on ``<exchange>/<routing key>`` when the key is not empty, and a
        fanout exchange ignores keys (kombu's own consumers subscribe per key)."""
        channel = self.fanout_channel(exchange)
        return channel, f"{channel}/*"

    # -- Conveyor's own ----------------------------------------------------------------
    @property
    def deliveries(self) -> str:
        return self.prefix + "_conveyor.deliveries"

    def leased(self, queue: str) -> str:
        return f"{self.prefix}_conveyor.leased.{queue}"

    def delayed(self, queue: str) -> str:
        return f"{self.prefix}_conveyor.delayed.{queue}"

    def delayed_messages(self, queue: str) -> str:
        return f"{self.prefix}_conveyor.delayed_messages.{queue}"

    def dead(self, queue: str) -> str:
        return f"{self.prefix}_conveyor.dead.{queue}"

    @property
    def queues(self) -> str:
        return self.prefix + "_conveyor.queues"

    @property
    def exchanges(self) -> str:
        return self.prefix + "_conveyor.exchanges"

    def headers_bindings(self, exchange: str) -> str:
        return f"{self.prefix}_conveyor.headers_bindings.{exchange}"

    def fanout_queues(self, exchange: str) -> str:
        return f"{self.prefix}_conveyor.fanout.{exchange}"

    def queue_keys(self, queue: str) -> list[str]:
        """The per-queue keys the fetch script reads, in its KEYS order."""
        return [
            self.leased(queue),
            self.delayed(queue),
            self.delayed_messages(queue),
            self.dead(queue),
        ]


_TOPIC_WILDCARDS = {"*": r"[^\.]+", "#": r".*?"}


def topic_pattern(routing_key: str) -> str:
    """The regex kombu's topic exchange stores in a binding, so Celery publishers route
    to queues Conveyor bound: '*' is one word, '#' any words."""
    words = []
    for word in routing_key.split("."):
        if word in _TOPIC_WILDCARDS:
            words.append(_TOPIC_WILDCARDS[word])
        else:
            words.append("".join(c if c.isalnum() or c in "#*" else "\\" + c for c in word))
    return "^" + r"\.".join(words) + "$"


def encode_envelope(
    envelope: Envelope,
    exchange: str,
    routing_key: str,
    tag: str,
    *,
    extra_properties: Mapping[str, Any] | None = None,
) -> str:
    """The JSON kombu's Redis transport stores: base64 body, hyphenated content keys."""
    properties = {k: v for k, v in envelope.properties.items() if k not in TRANSPORT_PROPERTIES}
    properties.update(extra_properties or {})
    properties["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = tag
    document = {
        "body": base64.b64encode(envelope.body).decode("ascii"),
        "content-encoding": envelope.content_encoding,
        "content-type": envelope.content_type,
        "headers": envelope.headers,
        "properties": properties,
    }
    try:
        return json.dumps(document)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"message headers and properties must be JSON: {exc}") from exc


@dataclass(frozen=True)
class StoredMessage:
    envelope: Envelope
    exchange: str
    routing_key: str
    redelivered: bool


INVALID_CONTENT_TYPE = "application/x-conveyor-invalid-envelope"


def decode_envelope(payload: bytes | str) -> StoredMessage:
    """Read a stored envelope. One that can't be read comes back with its raw bytes as
    the body and a content type no codec has, so the worker dead-letters it with a reason
    instead of the broker dropping it."""
    try:
        document = json.loads(payload)
        properties = dict(document.get("properties") or {})
        headers = document.get("headers")
        encoding = properties.get("body_encoding")
        raw_body = document.get("body", "")
        if encoding == "base64":
            body = base64.b64decode(raw_body, validate=True)
        elif isinstance(raw_body, str):
            body = raw_body.encode("utf-8")
        else:
            raise TypeError("body is not a string")
        info = properties.get("delivery_info") or {}
        redelivered = bool(info.get("redelivered")) or (
            (type(headers) is dict or isinstance(headers, Mapping))
            and bool(headers.get("redelivered"))
        )
        envelope = Envelope(
            body,
            str(document.get("content-type") or ""),
            str(document.get("content-encoding") or ""),
            headers if isinstance(headers, dict) else {},
            {k: v for k, v in properties.items() if k not in TRANSPORT_PROPERTIES},
        )
        return StoredMessage(
            envelope,
            str(info.get("exchange") or ""),
            str(info.get("routing_key") or ""),
            redelivered,
        )
    except (ValueError, TypeError, AttributeError, binascii.Error):
        raw = payload if isinstance(payload, bytes) else payload.encode("utf-8", "replace")
        return StoredMessage(Envelope(raw, INVALID_CONTENT_TYPE, "binary", {}, {}), "", "", False)


def mark_redelivered(payload: bytes | str) -> str:
    """The envelope as kombu restores it: ``redelivered`` set in headers and
    delivery_info. Raises ValueError if it is not a JSON envelope."""
    document = json.loads(payload)
    if not isinstance(document, dict):
        raise ValueError("envelope is not a JSON object")
    headers = document.get("headers")
    if isinstance(headers, dict):
        headers["redelivered"] = True
    properties = document.get("properties")
    if isinstance(properties, dict):
        info = properties.setdefault("delivery_info", {})
        if isinstance(info, dict):
            info["redelivered"] = True
    return json.dumps(document)


_UNSAFE_NAME = re.compile(r"[\x00-\x1f]")


def check_queue_name(name: str) -> None:
    if _UNSAFE_NAME.search(name):
        raise ConfigurationError(f"queue name {name!r} contains control characters")
