"""Typed, frozen settings, named as Celery names them.

Sources, later ones winning: defaults, ``config_from_object`` (a module, a dotted name,
an object or a mapping), ``Conveyor(...)`` keyword arguments, then ``CONVEYOR_*``
environment variables (``CONVEYOR_BROKER_URL``, ``CONVEYOR_TASK_ACKS_LATE=true``,
``CONVEYOR_ACCEPT_CONTENT='["json", "msgpack"]'``). An unknown name is an error that
suggests the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from conveyor.errors import ConfigurationError

DEFAULT_URL = "sqlite:///.conveyor/conveyor.db"

RouteSpec = str | Mapping[str, Any]
Router = Callable[..., RouteSpec | None]
TaskRoutes = Mapping[str, RouteSpec] | Sequence[Mapping[str, RouteSpec] | Router] | Router


@dataclass(frozen=True)
class Settings:
    # broker
    broker_url: str = DEFAULT_URL
    broker_transport_options: Mapping[str, Any] = field(default_factory=dict)
    broker_connection_retry: bool = True
    broker_connection_max_retries: int | None = 100
    broker_connection_timeout: float = 4.0
    task_publish_retry: bool = True
    task_publish_retry_policy: Mapping[str, Any] = field(default_factory=lambda: {
        "max_retries": 3, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.2})
    # serialization
    task_serializer: str = "json"
    result_serializer: str = "json"
    accept_content: Sequence[str] = ("json",)
    result_accept_content: Sequence[str] | None = None
    task_compression: str | None = None
    # routing
    task_routes: TaskRoutes | None = None
    task_queues: Sequence[Any] | None = None
    task_default_queue: str = "celery"
    task_default_exchange: str | None = None
    task_default_exchange_type: str = "direct"
    task_default_routing_key: str | None = None
    task_default_priority: int | None = None
    task_default_delivery_mode: int | str = 2
    task_create_missing_queues: bool = True
    task_queue_max_priority: int | None = None
    # task execution
    task_acks_late: bool = False
    task_acks_on_failure_or_timeout: bool = True
    task_reject_on_worker_lost: bool = False
    task_track_started: bool = False
    task_track_received: bool = False
    task_ignore_result: bool = False
    task_store_errors_even_if_ignored: bool = False
    task_time_limit: float | None = None
    task_soft_time_limit: float | None = None
    task_default_retry_delay: float = 180.0
    task_max_retries: int | None = 3
    task_always_eager: bool = False
    task_eager_propagates: bool = False
    # results
    result_backend: str | None = DEFAULT_URL
    result_expires: float | None = 86400.0
    result_extended: bool = False
    result_backend_transport_options: Mapping[str, Any] = field(default_factory=dict)
    result_backend_always_retry: bool = True
    result_backend_max_retries: int = 10
    result_backend_base_sleep_between_retries_ms: int = 10
    result_backend_max_sleep_between_retries_ms: int = 10000
    # worker
    worker_concurrency: int | None = None
    worker_prefetch_multiplier: int = 4
    worker_disable_prefetch: bool = False
    worker_max_tasks_per_child: int | None = None
    worker_max_memory_per_child: int | None = None
    worker_pool: str = "prefork"
    worker_max_deliveries: int | None = 10
    worker_lease_renew_interval: float | None = None
    worker_autoscale_keepalive: float = 5.0
    # time
    timezone: str = "UTC"
    enable_utc: bool = True

    def replace(self, **changes: Any) -> Settings:
        check_names(changes)
        return dataclasses.replace(self, **changes)

    @property
    def visibility_timeout(self) -> float:
        value = self.broker_transport_options.get("visibility_timeout")
        return float(value) if value is not None else 3600.0

    @property
    def effective_result_accept(self) -> Sequence[str]:
        return self.result_accept_content or self.accept_content


SETTING_NAMES: frozenset[str] = frozenset(f.name for f in fields(Settings))

ALIASES = {"broker": "broker_url", "backend": "result_backend"}


def check_names(values: Mapping[str, Any]) -> None:
    for name in values:
        if name not in SETTING_NAMES:
            close = difflib.get_close_matches(name, sorted(SETTING_NAMES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"unknown setting {name!r}{hint}")


def _setting_type(name: str) -> str:
    return str(Settings.__dataclass_fields__[name].type)


def parse_env_value(name: str, raw: str) -> Any:
    kind = _setting_type(name)
    text = raw.strip()
    if kind.startswith("bool"):
        lowered = text.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigurationError(f"CONVEYOR_{name.upper()} must be true or false, not {raw!r}")
    if text.lower() in {"none", "null"} and "None" in kind:
        return None
    if kind.startswith(("int", "float")):
        try:
            number = float(text)
        except ValueError as exc:
            raise ConfigurationError(f"CONVEYOR_{name.upper()} must be a number") from exc
        return int(number) if kind.startswith("int") and number.is_integer() else number
    if kind.startswith(("Sequence", "Mapping", "TaskRoutes")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if kind.startswith("Sequence"):
                return tuple(part.strip() for part in text.split(",") if part.strip())
            raise ConfigurationError(f"CONVEYOR_{name.upper()} must be JSON") from None
    return raw


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("CONVEYOR_"):
            continue
        name = key[len("CONVEYOR_"):].lower()
        name = ALIASES.get(name, name)
        if name not in SETTING_NAMES:
            continue  # other tools' CONVEYOR_* variables are not ours to judge
        values[name] = parse_env_value(name, raw)
    return values


def from_object(source: Any) -> dict[str, Any]:
    """Settings from a mapping, a module, a dotted module name or any object.

    Only lowercase public names count, as with Celery's ``config_from_object``; in a
    module, names that are other modules, functions or classes are skipped.
    """
    if isinstance(source, str):
        try:
            source = importlib.import_module(source)
        except ImportError as exc:
            raise ConfigurationError(
                f"cannot import configuration module {source!r}: {exc}") from exc
    if isinstance(source, Mapping):
        items = dict(source)
    else:
        items = {
            name: getattr(source, name)
            for name in dir(source)
            if not name.startswith("_") and name.islower()
        }
        if isinstance(source, types.ModuleType):
            items = {
                name: value for name, value in items.items()
                if not isinstance(value, (types.ModuleType, types.FunctionType, type))
            }
    items = {ALIASES.get(name, name): value for name, value in items.items()}
    check_names(items)
    return items


def build_settings(
    base: Settings | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    values = {ALIASES.get(k, k): v for k, v in (overrides or {}).items()}
    check_names(values)
    values.update(from_environ(os.environ if environ is None else environ))
    if "broker_url" in values and "result_backend" not in values and base is None:
        values["result_backend"] = _default_backend_for(values["broker_url"])
    return (base or Settings()).replace(**values)


def _default_backend_for(broker_url: str | None) -> str | None:
    # The embedded brokers keep results next to the messages; for the others, results
    # are opt-in (as in Celery), since a broker is no place to keep them.
    if broker_url and broker_url.split("://", 1)[0] in {"sqlite", "memory"}:
        return broker_url
    return None
