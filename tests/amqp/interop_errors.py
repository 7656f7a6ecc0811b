"""An exception both interop apps raise, importable by either side."""

from __future__ import annotations


class InteropError(Exception):
    """A user's exception: type, arguments and module must survive the trip."""
