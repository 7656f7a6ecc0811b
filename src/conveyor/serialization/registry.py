"""Codec registry: serializer names, content types, the accept-list, and the built-in codecs.

A codec is known by a short name (``"json"``) and by the content type it puts in the
message properties (``"application/json"``); every lookup takes either. Decoding is keyed
by content type and gated by the caller's accept set, so a content type the caller did not
list (pickle above all) is refused before any of its bytes are looked at.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from conveyor.errors import (
    ConfigurationError,
    ContentDisallowed,
    DecodeError,
    EncodeError,
    SerializationError,
)
from conveyor.serialization.json_codec import (
    from_tagged,
    json_dumps,
    json_loads,
    to_tagged,
    unsupported_type_error,
)

__all__ = [
    "Codec",
    "content_type_of",
    "dumps",
    "generation",
    "is_builtin_json",
    "loads",
    "lookup",
    "normalize_accept",
    "register",
    "registered_names",
]

BINARY = "binary"
"""``content_encoding`` of codecs whose bytes are not text."""

# Charsets whose bytes are already valid UTF-8, so a text body needs no transcoding.
_UTF8_COMPATIBLE = frozenset({"utf-8", "utf8", "us-ascii", "ascii", BINARY})


@dataclass(frozen=True, slots=True)
class Codec:
    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


_BY_NAME: dict[str, Codec] = {}
_BY_CONTENT_TYPE: dict[str, Codec] = {}
_generation = 0


def register(
    name: str,
    content_type: str,
    content_encoding: str,
    dumps: Callable[[Any], bytes],
    loads: Callable[[bytes], Any],
) -> None:
    """Add a codec, replacing any codec already registered under ``name``."""
    global _generation
    _generation += 1
    previous = _BY_NAME.pop(name, None)
    if previous is not None:
        _BY_CONTENT_TYPE.pop(previous.content_type, None)
    codec = Codec(name, content_type, content_encoding, dumps, loads)
    _BY_NAME[name] = codec
    _BY_CONTENT_TYPE[content_type] = codec


def registered_names() -> list[str]:
    return sorted(_BY_NAME)


def generation() -> int:
    """A number that changes whenever a codec is registered: what was decided from the
    registry (see :func:`is_builtin_json`) holds while it stays the same."""
    return _generation


def is_builtin_json(serializer: str) -> bool:
    """Whether ``serializer`` (a name or content type) is the built-in JSON codec, whose
    output encoders that write JSON themselves (the producer's lean path) reproduce."""
    codec = _find(serializer)
    return (
        codec is not None
        and codec.dumps is json_dumps
        and codec.content_type == "application/json"
        and codec.content_encoding == "utf-8"
    )


def lookup(serializer: str) -> Codec:
    """The codec for a short name or a content type."""
    codec = _find(serializer)
    if codec is None:
        raise ConfigurationError(
            f"unknown serializer {serializer!r}: use one of {_known_serializers()}"
        )
    return codec


def _find(serializer: str) -> Codec | None:
    return _BY_NAME.get(serializer) or _BY_CONTENT_TYPE.get(serializer)


def content_type_of(serializer: str) -> tuple[str, str]:
    """``(content_type, content_encoding)`` of a short name or content type."""
    codec = lookup(serializer)
    return codec.content_type, codec.content_encoding


def normalize_accept(names: Iterable[str]) -> frozenset[str]:
    """Content types for an ``accept_content`` list of short names and/or content types."""
    if isinstance(names, str):  # a lone "json" must not be iterated letter by letter
        names = [names]
    accepted: set[str] = set()
    for name in names:
        codec = _find(name)
        if codec is None:
            raise ConfigurationError(
                f"unknown serializer {name!r} in accept_content: use one of {_known_serializers()}"
            )
        accepted.add(codec.content_type)
    return frozenset(accepted)


def dumps(obj: Any, serializer: str) -> tuple[bytes, str, str]:
    """Encode ``obj``; returns ``(body, content_type, content_encoding)``."""
    codec = lookup(serializer)
    try:
        body = codec.dumps(obj)
    except (SerializationError, ConfigurationError):
        raise
    except Exception as exc:  # codecs fail in many ways (TypeError, ValueError, pickle's own)
        raise EncodeError(f"{codec.name} cannot encode the value: {exc}") from exc
    return body, codec.content_type, codec.content_encoding


def loads(data: bytes, content_type: str, content_encoding: str, accept: frozenset[str]) -> Any:
    """Decode a body, refusing content types that are not in ``accept``."""
    if content_type not in accept:
        raise ContentDisallowed(
            f"refusing to decode content of type {_describe(content_type)}: "
            f"accepted types are {sorted(accept)}; add it to accept_content to allow it"
        )
    codec = _BY_CONTENT_TYPE.get(content_type)
    if codec is None:
        raise DecodeError(
            f"no codec for content type {content_type!r}: registered are {_known_serializers()}"
        )
    try:
        if codec.content_encoding != BINARY:
            data = _as_utf8(data, content_encoding)
        return codec.loads(data)
    except ConfigurationError:
        raise
    except Exception as exc:  # arbitrary bytes can break a decoder in arbitrary ways
        raise DecodeError(f"cannot decode {content_type} body: {exc}") from exc


def _as_utf8(data: bytes, charset: str) -> bytes:
    """Text codecs read UTF-8; a body declared in another charset is transcoded first."""
    charset = (charset or "utf-8").lower()
    if charset in _UTF8_COMPATIBLE:
        return data
    return data.decode(charset).encode("utf-8")


def _describe(content_type: str) -> str:
    codec = _BY_CONTENT_TYPE.get(content_type)
    return f"{content_type!r}" if codec is None else f"{content_type!r} ({codec.name})"


def _known_serializers() -> str:
    return ", ".join(f"{name} ({_BY_NAME[name].content_type})" for name in sorted(_BY_NAME))


# -- built-in codecs --------------------------------------------------------------------


def _import_extra(module: str, extra: str) -> Any:
    """Import an optional dependency, or explain which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{extra} serializer needs the '{extra}' extra: pip install 'conveyor[{extra}]'"
        ) from exc


def _msgpack_default(value: Any) -> Any:
    # The JSON tags keep datetime, Decimal and UUID intact; a kombu peer, whose msgpack
    # codec has no hooks, still reads them as plain maps instead of failing.
    tagged = to_tagged(value)
    if tagged is None:
        raise unsupported_type_error("msgpack", value)
    return tagged


def _msgpack_dumps(obj: Any) -> bytes:
    msgpack = _import_extra("msgpack", "msgpack")
    body: bytes = msgpack.packb(obj, use_bin_type=True, default=_msgpack_default)
    return body


def _msgpack_loads(data: bytes) -> Any:
    msgpack = _import_extra("msgpack", "msgpack")
    return msgpack.unpackb(data, raw=False, object_hook=from_tagged)


def _yaml_dumps(obj: Any) -> bytes:
    yaml = _import_extra("yaml", "yaml")
    try:
        body: bytes = yaml.safe_dump(obj, encoding="utf-8")
    except yaml.representer.RepresenterError as exc:
        # PyYAML reports ("cannot represent an object", value); name the type instead.
        if len(exc.args) == 2:
            raise unsupported_type_error("yaml", exc.args[1]) from exc
        raise
    return body


def _yaml_loads(data: bytes) -> Any:
    yaml = _import_extra("yaml", "yaml")
    return yaml.safe_load(data)


# Protocol 4 is what kombu writes by default; every Python a Celery peer runs can read it.
_PICKLE_PROTOCOL = 4


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _pickle_loads(data: bytes) -> Any:
    return pickle.loads(data)  # only reached when the caller's accept set lists pickle


register("json", "application/json", "utf-8", json_dumps, json_loads)
register("msgpack", "application/x-msgpack", BINARY, _msgpack_dumps, _msgpack_loads)
register("yaml", "application/x-yaml", "utf-8", _yaml_dumps, _yaml_loads)
register("pickle", "application/x-python-serialize", BINARY, _pickle_dumps, _pickle_loads)
