"""Celery's result document and exception encoding, built and read in one place."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from conveyor import errors, states
from conveyor.errors import ConveyorError

_SYNTHESIZED: dict[tuple[str, str], type[BaseException]] = {}


def jsonable(value: Any) -> Any:
    """Make an exception argument safe for any serializer (Celery does the same)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    return repr(value)


def exception_module(exc_type: type[BaseException]) -> str:
    if issubclass(exc_type, ConveyorError) and exc_type.__name__ in errors.WIRE_MODULES:
        return errors.WIRE_MODULES[exc_type.__name__]
    return exc_type.__module__


def encode_exception(exc: BaseException) -> dict[str, Any]:
    exc_type = type(exc)
    return {
        "exc_type": exc_type.__qualname__,
        "exc_message": jsonable(list(exc.args)),
        "exc_module": exception_module(exc_type),
    }


def _conveyor_twin(module: str, name: str) -> type[BaseException] | None:
    # Celery's own exceptions come back as ours, so ``except TaskRevokedError`` works
    # whichever side stored them.
    if module.startswith(("celery", "billiard")) and errors.WIRE_MODULES.get(name) == module:
        found = getattr(errors, name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
    return None


def _import_exception(module: str, qualname: str) -> type[BaseException] | None:
    twin = _conveyor_twin(module, qualname)
    if twin is not None:
        return twin
    # Look only in modules already loaded, as Celery does: the document comes from
    # whoever can write to the backend, and importing a module it names runs that code.
    try:
        target: Any = sys.modules[module]
        for part in qualname.split("."):
            target = getattr(target, part)
    except (KeyError, AttributeError):
        return None
    if isinstance(target, type) and issubclass(target, BaseException):
        return target
    raise errors.ConveyorError(
        f"refusing to rebuild {module}.{qualname}: it is not an exception class"
    )


def synthesize(module: str, qualname: str) -> type[BaseException]:
    key = (module, qualname)
    if key not in _SYNTHESIZED:
        name = qualname.rsplit(".", 1)[-1]
        _SYNTHESIZED[key] = type(name, (Exception,), {"__module__": module})
    return _SYNTHESIZED[key]


def decode_exception(value: Any) -> BaseException:
    """Rebuild a stored exception as its original type where that type can be imported."""
    if isinstance(value, BaseException):
        return value
    if not isinstance(value, Mapping) or "exc_type" not in value:
        return errors.ConveyorError(f"unreadable exception document: {value!r}")
    qualname = str(value["exc_type"])
    module = str(value.get("exc_module") or "builtins")
    message = value.get("exc_message")
    args = list(message) if isinstance(message, (list, tuple)) else [message]
    exc_type = _import_exception(module, qualname) or synthesize(module, qualname)
    try:
        return exc_type(*args)
    except Exception:  # a constructor with another signature
        exc = exc_type.__new__(exc_type)
        exc.args = tuple(args)
        return exc


def is_builtin_exception(exc_type: type[BaseException]) -> bool:
    return getattr(builtins, exc_type.__name__, None) is exc_type


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def build_meta(
    task_id: str,
    status: str,
    result: Any,
    *,
    traceback: str | None = None,
    children: list[Any] | None = None,
    request: Mapping[str, Any] | None = None,
    extended: bool = False,
) -> dict[str, Any]:
    """The result document in Celery's field order and shape (PROTOCOL.md 4.2)."""
    if status in states.EXCEPTION_STATES and isinstance(result, BaseException):
        result = encode_exception(result)
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": children or [],
        "date_done": now_iso() if status in states.READY_STATES else None,
    }
    if request is not None:
        if request.get("group") is not None:
            meta["group_id"] = request["group"]
        if request.get("parent_id") is not None:
            meta["parent_id"] = request["parent_id"]
        if extended:
            meta.update(
                name=request.get("task"),
                args=request.get("args"),
                kwargs=request.get("kwargs"),
                worker=request.get("hostname"),
                retries=request.get("retries"),
                queue=(request.get("delivery_info") or {}).get("routing_key"),
            )
    meta["task_id"] = task_id
    return meta
