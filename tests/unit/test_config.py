from __future__ import annotations

import types

import pytest

from conveyor import Conveyor
from conveyor.config import Settings, build_settings, from_environ
from conveyor.errors import ConfigurationError


def test_unknown_setting_is_an_error_with_a_hint() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'task_acks_late'"):
        Conveyor("proj", task_ack_late=True)


def test_broker_and_backend_keywords() -> None:
    app = Conveyor("proj", broker="memory://a", backend="memory://b")
    assert app.conf.broker_url == "memory://a"
    assert app.conf.result_backend == "memory://b"


def test_embedded_broker_keeps_results_beside_it_by_default() -> None:
    settings = build_settings(overrides={"broker_url": "sqlite:///x.db"}, environ={})
    assert settings.result_backend == "sqlite:///x.db"
    remote = build_settings(overrides={"broker_url": "redis://localhost"}, environ={})
    assert remote.result_backend is None


def test_environment_overrides_and_types() -> None:
    values = from_environ({
        "CONVEYOR_TASK_ACKS_LATE": "true",
        "CONVEYOR_WORKER_PREFETCH_MULTIPLIER": "1",
        "CONVEYOR_ACCEPT_CONTENT": '["json", "msgpack"]',
        "CONVEYOR_RESULT_EXPIRES": "none",
        "CONVEYOR_BROKER": "memory://env",
        "CONVEYOR_SOMETHING_ELSE": "ignored",
    })
    assert values == {"task_acks_late": True, "worker_prefetch_multiplier": 1,
                      "accept_content": ["json", "msgpack"], "result_expires": None,
                      "broker_url": "memory://env"}
    settings = build_settings(environ={"CONVEYOR_TASK_ACKS_LATE": "1"})
    assert settings.task_acks_late is True


def test_bad_boolean_in_environment() -> None:
    with pytest.raises(ConfigurationError, match="true or false"):
        from_environ({"CONVEYOR_TASK_ACKS_LATE": "maybe"})


def test_config_from_object_module_and_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_TASK_SERIALIZER", raising=False)
    module = types.ModuleType("proj_config")
    module.task_serializer = "msgpack"  # type: ignore[attr-defined]
    module.accept_content = ["json", "msgpack"]  # type: ignore[attr-defined]
    module.os = types  # type: ignore[attr-defined]  # imported modules are skipped
    app = Conveyor("proj", broker="memory://cfg")
    app.config_from_object(module)
    assert app.conf.task_serializer == "msgpack"
    assert app.conf.broker_url == "memory://cfg"  # keyword arguments still win
    with pytest.raises(ConfigurationError, match="unknown setting 'task_serialiser'"):
        app.config_from_object({"task_serialiser": "json"})


def test_visibility_timeout_from_transport_options() -> None:
    assert Settings().visibility_timeout == 3600.0
    settings = Settings(broker_transport_options={"visibility_timeout": 12})
    assert settings.visibility_timeout == 12.0
