"""The property list of a message's content header, written the way py-amqp writes it,
only faster.

py-amqp encodes every header of every message through generic type dispatch: for a
Celery task message (about twenty headers) that took 18 µs on the reference machine, 40%
of the time of the I/O thread, which writes every message published, so it bounded the
publish rate. A task's headers repeat from call to call, so the encoding of each
``(key, value)`` pair of a simple value is remembered, and the rest is written directly.

Only exact ``str``, ``bytes``, ``bool``, ``int``, ``float``, ``None``, ``dict``,
``list`` and ``tuple`` values are written here; a message with anything else (a
``Decimal``, a ``datetime``, a subclass) is left to py-amqp, as is any property this
module does not know. The output is byte for byte py-amqp's (the tests compare them).
"""

from __future__ import annotations

from collections.abc import Mapping
from struct import Struct
from typing import Any

_U8 = Struct("B")
_U16 = Struct(">H")
_U32 = Struct(">I")
_I32 = Struct(">i")
_I64 = Struct(">q")
_U64 = Struct(">Q")
_F64 = Struct(">d")

# (name, kind) of the basic class's properties, in the order of the property list.
_PROPERTIES = (
    ("content_type", "s"),
    ("content_encoding", "s"),
    ("application_headers", "F"),
    ("delivery_mode", "o"),
    ("priority", "o"),
    ("correlation_id", "s"),
    ("reply_to", "s"),
    ("expiration", "s"),
    ("message_id", "s"),
    ("timestamp", "L"),
    ("type", "s"),
    ("user_id", "s"),
    ("app_id", "s"),
    ("cluster_id", "s"),
)
_KNOWN = frozenset(name for name, _ in _PROPERTIES)

_CACHE_LIMIT = 4096
"""Pairs remembered at most; past that the memory starts over (ids never repeat, but
they are strings, and strings are written, not remembered)."""
_pairs: dict[tuple[str, type, Any], bytes] = {}
_keys: dict[str, bytes] = {}


class Unsupported(Exception):
    """A value this module leaves to py-amqp."""


def _key(name: str) -> bytes:
    encoded = _keys.get(name)
    if encoded is None:
        raw = name.encode("utf-8", "surrogatepass")
        encoded = _U8.pack(len(raw)) + raw  # struct.error past 255, as py-amqp
        if len(_keys) < _CACHE_LIMIT:
            _keys[name] = encoded
    return encoded


def _item(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        raw: bytes = value.encode("utf-8", "surrogatepass")
        return b"S" + _U32.pack(len(raw)) + raw
    if kind is bytes:
        return b"S" + _U32.pack(len(value)) + bytes(value)
    if value is None:
        return b"V"
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int:
        if value > 2147483647 or value < -2147483647:
            return b"L" + _I64.pack(value)
        return b"I" + _I32.pack(value)
    if kind is float:
        return b"d" + _F64.pack(value)
    if kind is dict:
        return b"F" + table(value)
    if kind is list or kind is tuple:
        data = b"".join([_item(member) for member in value])
        return b"A" + _U32.pack(len(data)) + data
    raise Unsupported(kind)


def table(values: Mapping[Any, Any]) -> bytes:
    """An AMQP field table, its length first."""
    parts = []
    for name, value in values.items():
        if type(name) is not str:
            raise Unsupported(type(name))
        kind = type(value)
        if value is None or kind is bool or kind is int:
            pair = (name, kind, value)
            encoded = _pairs.get(pair)
            if encoded is None:
                encoded = _key(name) + _item(value)
                if len(_pairs) >= _CACHE_LIMIT:
                    _pairs.clear()
                _pairs[pair] = encoded
            parts.append(encoded)
        else:
            parts.append(_key(name) + _item(value))
    data = b"".join(parts)
    return _U32.pack(len(data)) + data


def _short(value: Any) -> bytes:
    if type(value) is str:
        raw: bytes = value.encode("utf-8", "surrogatepass")
    elif type(value) is bytes:
        raw = value
    else:
        raise Unsupported(type(value))
    return _U8.pack(len(raw)) + raw


def encode_properties(properties: Mapping[str, Any]) -> bytes | None:
    """Property flags and list as py-amqp's ``_serialize_properties`` writes them, or
    None for a message to leave to py-amqp."""
    if not properties.keys() <= _KNOWN:
        return None
    flags = 0
    parts = []
    bit = 1 << 15
    try:
        for name, kind in _PROPERTIES:
            value = properties.get(name)
            if value is not None:
                flags |= bit
                if kind == "s":
                    parts.append(_short(value))
                elif kind == "F":
                    parts.append(table(value))
                elif kind == "o":
                    parts.append(_U8.pack(value))
                else:  # "L"
                    parts.append(_U64.pack(value))
            bit >>= 1
    except (Unsupported, TypeError):
        return None
    return _U16.pack(flags) + b"".join(parts)
