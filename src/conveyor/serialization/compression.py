"""Body compression with kombu's codec names and MIME types (PROTOCOL.md §1.7).

The ``compression`` header carries the MIME type; ``content_type`` still describes the
uncompressed payload. kombu labels zlib data ``application/x-gzip``, so that is what
``"gzip"`` produces here too.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conveyor.errors import ConfigurationError, DecodeError

__all__ = ["compress", "decompress", "known_codecs"]

GZIP = "application/x-gzip"
BZIP2 = "application/x-bz2"
LZMA = "application/x-lzma"
BROTLI = "application/x-brotli"
ZSTD = "application/zstd"

_ALIASES = {
    "gzip": GZIP,
    "zlib": GZIP,
    "bzip2": BZIP2,
    "bzip": BZIP2,
    "lzma": LZMA,
    "xz": LZMA,
    "brotli": BROTLI,
    "zstd": ZSTD,
    "zstandard": ZSTD,
}

# zlib's wbits for "zlib or gzip header, detected automatically": kombu peers send zlib,
# but a producer that took the MIME type literally may send real gzip.
_ZLIB_OR_GZIP = 32 + zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class _Compressor:
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _zlib_or_gzip_decompress(data: bytes) -> bytes:
    return zlib.decompress(data, _ZLIB_OR_GZIP)


_COMPRESSORS: dict[str, _Compressor] = {
    GZIP: _Compressor(zlib.compress, _zlib_or_gzip_decompress),
    BZIP2: _Compressor(bz2.compress, bz2.decompress),
    LZMA: _Compressor(lzma.compress, lzma.decompress),
}

# MIME types kombu knows but this Python cannot handle, and why. Conveyor only uses the
# standard library here; it gained zstd in Python 3.14 and has no brotli at all.
_UNSUPPORTED: dict[str, str] = {BROTLI: "brotli is not in the Python standard library"}

try:
    _zstd: Any = importlib.import_module("compression.zstd")
except ImportError:
    _UNSUPPORTED[ZSTD] = "zstd needs Python 3.14 or later (compression.zstd)"
else:
    _COMPRESSORS[ZSTD] = _Compressor(_zstd.compress, _zstd.decompress)


def known_codecs() -> list[str]:
    """Names and MIME types ``compress`` and ``decompress`` understand."""
    return sorted({*_ALIASES, *_COMPRESSORS, *_UNSUPPORTED})


def _mime_of(codec: str) -> str | None:
    codec = codec.strip().lower()
    if codec in _COMPRESSORS or codec in _UNSUPPORTED:
        return codec
    return _ALIASES.get(codec)


def compress(data: bytes, codec: str) -> tuple[bytes, str]:
    """Compress ``data``; returns the bytes and the MIME type for the ``compression`` header."""
    mime = _mime_of(codec)
    if mime is None:
        raise ConfigurationError(
            f"unknown compression {codec!r}: use one of {', '.join(known_codecs())}"
        )
    if mime in _UNSUPPORTED:
        raise ConfigurationError(f"compression {codec!r} is not supported: {_UNSUPPORTED[mime]}")
    compressor = _COMPRESSORS[mime]
    return compressor.compress(data), mime


def decompress(data: bytes, mime: str) -> bytes:
    """Undo ``compress``; ``mime`` is the ``compression`` header (kombu aliases work too)."""
    canonical = _mime_of(mime)
    if canonical is None:
        raise DecodeError(f"unknown compression {mime!r}: known are {', '.join(known_codecs())}")
    if canonical in _UNSUPPORTED:
        raise DecodeError(f"compression {mime!r} is not supported: {_UNSUPPORTED[canonical]}")
    compressor = _COMPRESSORS[canonical]
    try:
        return compressor.decompress(data)
    except Exception as exc:  # each library has its own error types (zlib.error, OSError...)
        raise DecodeError(f"cannot decompress {canonical} body: {exc}") from exc
