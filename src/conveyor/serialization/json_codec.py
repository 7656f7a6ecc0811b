"""JSON codec, byte-compatible with kombu's, and the tagged envelopes it shares with msgpack.

JSON has no datetime, Decimal, UUID or bytes, so those travel as an object with exactly
two keys, ``{"__type__": <tag>, "__value__": <value>}`` (PROTOCOL.md §1.7). Encoding goes
through the stdlib C encoder with a ``default=`` hook, which only runs for values JSON
cannot represent, so ordinary payloads never touch Python code per value.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from conveyor.errors import DecodeError, EncodeError

__all__ = [
    "from_tagged",
    "json_dumps",
    "json_loads",
    "json_text",
    "to_tagged",
    "unsupported_type_error",
]

TYPE_KEY = "__type__"
VALUE_KEY = "__value__"


def _envelope(tag: str, value: Any) -> dict[str, Any]:
    return {TYPE_KEY: tag, VALUE_KEY: value}


def _tag_datetime(value: datetime) -> dict[str, Any]:
    return _envelope("datetime", value.isoformat())


def _tag_date(value: date) -> dict[str, Any]:
    return _envelope("date", value.isoformat())


def _tag_time(value: time) -> dict[str, Any]:
    return _envelope("time", value.isoformat())


def _tag_decimal(value: Decimal) -> dict[str, Any]:
    return _envelope("decimal", str(value))


def _tag_uuid(value: uuid.UUID) -> dict[str, Any]:
    return _envelope("uuid", {"hex": value.hex})


def _tag_bytes(value: bytes | bytearray) -> dict[str, Any]:
    # Text stays readable on the wire; anything else needs base64.
    try:
        return _envelope("bytes", value.decode("utf-8"))
    except UnicodeDecodeError:
        return _envelope("base64", base64.b64encode(value).decode("ascii"))


# Checked in this order for subclasses: datetime must come before date, its base class.
_TAGGERS: dict[type[Any], Callable[[Any], dict[str, Any]]] = {
    datetime: _tag_datetime,
    date: _tag_date,
    time: _tag_time,
    Decimal: _tag_decimal,
    uuid.UUID: _tag_uuid,
    bytes: _tag_bytes,
    bytearray: _tag_bytes,
}


def to_tagged(value: Any) -> dict[str, Any] | None:
    """The tagged envelope for ``value``, or ``None`` if it is not a tagged type."""
    tagger = _TAGGERS.get(type(value)) or _subclass_tagger(value)
    return None if tagger is None else tagger(value)


def _subclass_tagger(value: Any) -> Callable[[Any], dict[str, Any]] | None:
    for tagged_type, tagger in _TAGGERS.items():
        if isinstance(value, tagged_type):
            return tagger
    return None


def _untag_uuid(value: Any) -> uuid.UUID:
    return uuid.UUID(hex=value["hex"])


_UNTAGGERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    # kombu parses dates with the datetime parser, so a full timestamp is accepted too.
    "date": lambda text: datetime.fromisoformat(text).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": _untag_uuid,
    "bytes": lambda text: text.encode("utf-8"),
    "base64": base64.b64decode,
}


def from_tagged(obj: dict[str, Any]) -> Any:
    """Object hook: turn a tagged envelope back into its value, leave other objects alone."""
    # The membership test first: it rejects almost every object at the cost of one lookup.
    if TYPE_KEY not in obj or len(obj) != 2 or VALUE_KEY not in obj:
        return obj
    tag = obj[TYPE_KEY]
    untagger = _UNTAGGERS.get(tag) if isinstance(tag, str) else None
    if untagger is None:
        known = ", ".join(sorted(_UNTAGGERS))
        raise DecodeError(f"unknown __type__ tag {tag!r} (known tags: {known})")
    value = obj[VALUE_KEY]
    try:
        return untagger(value)
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        raise DecodeError(f"bad __value__ for __type__ {tag!r}: {value!r}") from exc


def unsupported_type_error(serializer: str, value: Any) -> EncodeError:
    """An EncodeError naming the type ``serializer`` could not encode, and what to do."""
    kind = type(value)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    if isinstance(value, (set, frozenset)):
        hint = "convert it to a list first"
    else:
        hint = (
            "pass plain data (dict, list, str, int, float, bool, None), datetime, date, time, "
            "Decimal, UUID or bytes"
        )
        if serializer == "json":
            hint += ", or give the class a __json__() method returning one of those"
    return EncodeError(f"{serializer} cannot encode an object of type {name!r}: {hint}")


def _encode_unsupported(value: Any) -> Any:
    """``default=`` hook of the JSON encoder: runs only for values JSON has no type for."""
    tagger = _TAGGERS.get(type(value))
    if tagger is None:
        # Same precedence as kombu: a __json__() method wins over a tagged base class.
        to_json = getattr(value, "__json__", None)
        if to_json is not None:
            return to_json()
        tagger = _subclass_tagger(value)
        if tagger is None:
            raise unsupported_type_error("json", value)
    return tagger(value)


# Built once: the encoder and decoder are stateless between calls, and constructing them
# per message (which json.dumps/json.loads do whenever a hook is passed) is wasted work.
# Every other option stays at the json module's defaults, which is what kombu emits:
# separators ", " and ": ", ensure_ascii=True.
_ENCODER = json.JSONEncoder(default=_encode_unsupported)
_DECODER = json.JSONDecoder(object_hook=from_tagged)


def json_text(value: Any) -> str:
    """``value`` as kombu's JSON serializer writes it, as text (pure ASCII)."""
    return _ENCODER.encode(value)


def json_dumps(value: Any) -> bytes:
    """Encode ``value`` exactly as kombu's JSON serializer does."""
    # ensure_ascii output is pure ASCII, so the UTF-8 encode is a plain copy.
    return _ENCODER.encode(value).encode("utf-8")


def json_loads(data: bytes) -> Any:
    """Decode UTF-8 JSON (any valid formatting), restoring tagged values."""
    return _DECODER.decode(data.decode("utf-8"))
