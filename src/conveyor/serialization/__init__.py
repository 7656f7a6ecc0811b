"""Message body serialization: kombu-compatible codecs, the accept-list, and compression.

``dumps``/``loads`` encode and decode bodies by serializer name or content type;
``normalize_accept`` turns an ``accept_content`` setting into the content types ``loads``
checks; ``compress``/``decompress`` handle the optional ``compression`` header.
"""

from __future__ import annotations

from conveyor.serialization.compression import compress, decompress
from conveyor.serialization.registry import (
    content_type_of,
    dumps,
    loads,
    normalize_accept,
    register,
    registered_names,
)
from conveyor.serialization.untyped import loads_untyped

__all__ = [
    "compress",
    "content_type_of",
    "decompress",
    "dumps",
    "loads",
    "loads_untyped",
    "normalize_accept",
    "register",
    "registered_names",
]
