"""Reading values stored without their content type (Celery's database and cache
backends keep only the bytes)."""

from __future__ import annotations

from typing import Any

from conveyor.errors import SerializationError
from conveyor.serialization.registry import content_type_of, loads

PICKLE_MARK = b"\x80"  # every pickle of protocol 2 or later starts with it


def loads_untyped(payload: bytes, serializer: str, accept: frozenset[str]) -> Any:
    """Decode with the configured serializer, as Celery does.

    Bytes that serializer cannot read but that carry pickle's marker are read as pickle
    (and refused unless pickle is accepted); a reader configured for pickle reads unmarked
    bytes as JSON, Celery's default.
    """
    pickled = payload[:1] == PICKLE_MARK
    name = "json" if serializer == "pickle" and not pickled else serializer
    try:
        return loads(payload, *content_type_of(name), accept)
    except SerializationError:
        if not pickled or name == "pickle":
            raise
    return loads(payload, *content_type_of("pickle"), accept)
