"""Finding the app a command line names: ``-A module`` or ``-A module:attribute``."""

from __future__ import annotations

import importlib
import os
import sys

from conveyor.app import Conveyor
from conveyor.errors import ConfigurationError


class AppNotFound(ConfigurationError):
    """The ``-A`` option names nothing importable, or no Conveyor app."""


def load_app(spec: str) -> Conveyor:
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppNotFound(f"cannot import {module_name!r}: {exc}") from exc
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, Conveyor):
            raise AppNotFound(f"{module_name!r} has no Conveyor app named {attribute!r}")
        return found
    for name in ("app", "conveyor", "celery"):
        found = getattr(module, name, None)
        if isinstance(found, Conveyor):
            return found
    apps = [value for value in vars(module).values() if isinstance(value, Conveyor)]
    if len(apps) == 1:
        return apps[0]
    if not apps:
        raise AppNotFound(f"module {module_name!r} defines no Conveyor app; "
                          f"name it with -A {module_name}:attribute")
    raise AppNotFound(f"module {module_name!r} defines several apps; "
                      f"choose one with -A {module_name}:attribute")
