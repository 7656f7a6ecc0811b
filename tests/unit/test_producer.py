"""The producer's lean path sends what its general path (build + encode) sends."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.unit.producing import Capture, assert_same, general, make_app

from conveyor import Conveyor
from conveyor.envelope import Envelope
from conveyor.request import Request, request_context
from conveyor.serialization import registry
from conveyor.serialization.json_codec import json_dumps, json_loads


@pytest.fixture
def app() -> Iterator[tuple[Conveyor, Capture]]:
    made = make_app()
    yield made
    made[0].close()


def check_call(app: Conveyor, capture: Capture, name: str, args: Any, kwargs: Any,
               options: dict[str, Any]) -> Envelope:
    """Send on the lean path and compare with the general path for the same task id."""
    assert app.producer.plan(name, options) is not None
    result = app.send_task(name, args, kwargs, **options)
    envelope, exchange, routing_key, delay = capture.sent[-1]
    assert delay is None
    assert envelope.headers["id"] == result.id
    expected, target = general(app, name, args, kwargs, {**options, "task_id": result.id})
    assert_same(envelope, expected)
    assert (exchange, routing_key) == (target.exchange, target.routing_key)
    return envelope


LEAN_OPTIONS: list[dict[str, Any]] = [
    {},
    {"queue": "other"},
    {"priority": 7},
    {"exchange": "ex", "routing_key": "rk"},
    {"exchange": "ex", "exchange_type": "topic", "routing_key": "a.b"},
    {"delivery_mode": 1},
    {"delivery_mode": "transient"},
    {"reply_to": "reply-here"},
    {"shadow": "shadowed"},
    {"time_limit": 10, "soft_time_limit": 5.5},
    {"time_limit": None},
    {"retries": 2},
    {"origin": "gen1@elsewhere"},
    {"ignore_result": False},
    {"ignore_result": True},
    {"task_id": "fixed-id"},
    {"root_id": "root", "parent_id": "parent"},
    {"group_id": "g", "group_index": 3},
    {"serializer": "json"},
    {"serializer": "application/json"},
    {"compression": None, "countdown": None, "eta": None, "expires": None, "link": None},
]

SETTINGS: list[dict[str, Any]] = [
    {},
    {"task_default_priority": 3},
    {"task_time_limit": 60, "task_soft_time_limit": 50},
    {"task_default_delivery_mode": "transient"},
    {"task_default_queue": "elsewhere"},
    {"task_routes": {"proj.*": {"queue": "routed", "priority": 4}}},
    {"task_routes": [{"proj.add": "math"}, {"proj.*": "rest"}]},
]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("options", LEAN_OPTIONS)
def test_lean_path_writes_what_the_general_path_writes(
    settings: dict[str, Any], options: dict[str, Any]
) -> None:
    app, capture = make_app(**settings)
    try:
        for args, kwargs in [((), None), ((1, "é"), {"k": [1.5, None]}), (None, {})]:
            check_call(app, capture, "proj.add", args, kwargs, dict(options))
    finally:
        app.close()


def test_options_equal_in_value_but_not_in_type_get_their_own_plans(
    app: tuple[Conveyor, Capture],
) -> None:
    conveyor, capture = app
    for options in [{"time_limit": 30}, {"time_limit": 30.0}, {"priority": 1},
                    {"priority": True}, {"ignore_result": 0}, {"ignore_result": False}]:
        check_call(conveyor, capture, "proj.add", (1,), {}, options)
    headers = [envelope.headers for envelope, *_ in capture.sent]
    assert type(headers[0]["timelimit"][0]) is int
    assert type(headers[1]["timelimit"][0]) is float


def test_a_callable_router_still_sees_each_calls_arguments() -> None:
    def by_size(name: str, args: Any, kwargs: Any, options: Any) -> Any:
        return "big" if args and args[0] > 100 else None

    app, capture = make_app(task_routes=[by_size])
    try:
        check_call(app, capture, "proj.add", (1000,), {}, {})
        assert capture.sent[-1][2] == "big"
        check_call(app, capture, "proj.add", (1,), {}, {})
        assert capture.sent[-1][2] == "celery"
    finally:
        app.close()


def test_a_call_inside_a_task_carries_its_root_and_parent(
    app: tuple[Conveyor, Capture],
) -> None:
    conveyor, capture = app
    parent = Request(id="parent-id", root_id="root-id", called_directly=False)
    with request_context(parent):
        envelope = check_call(conveyor, capture, "proj.add", (1,), {}, {})
        assert (envelope.headers["root_id"], envelope.headers["parent_id"]) == (
            "root-id", "parent-id")
        check_call(conveyor, capture, "proj.add", (1,), {}, {"root_id": "r", "parent_id": "p"})


def signature_of(conveyor: Conveyor) -> Any:
    @conveyor.task(name="proj.cb")
    def cb(x: int) -> int:
        return x

    return cb.s()


@pytest.mark.parametrize("option", [
    {"countdown": 5},
    {"eta": datetime(2030, 1, 1, tzinfo=UTC)},
    {"expires": 60},
    {"expires": datetime.now(UTC) + timedelta(hours=1)},
    {"headers": {"x-extra": 1}},
    {"acks_late": True},
    {"serializer": "pickle"},
    {"compression": "gzip"},
    {"link": "signature"},
    {"link_error": "signature"},
    {"chain": "signatures"},
    {"chord": "signature"},
])
def test_other_calls_take_the_general_path(
    app: tuple[Conveyor, Capture], option: dict[str, Any]
) -> None:
    conveyor, capture = app
    options = dict(option)
    for key, value in options.items():
        if value == "signature":
            options[key] = signature_of(conveyor)
        elif value == "signatures":
            options[key] = [signature_of(conveyor)]
    assert conveyor.producer.plan("proj.add", options) is None
    result = conveyor.send_task("proj.add", (1,), {}, **options)
    assert capture.sent[-1][0].headers["id"] == result.id
    assert capture.sent[-1][0].headers_json is None


def test_compression_in_settings_takes_the_general_path() -> None:
    app, _ = make_app(task_compression="gzip")
    try:
        assert app.producer.plan("proj.add", {}) is None
    finally:
        app.close()


def test_plans_follow_settings(app: tuple[Conveyor, Capture]) -> None:
    conveyor, capture = app

    @conveyor.task(name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(1, 2)
    assert capture.sent[-1][0].properties["priority"] == 0
    assert capture.sent[-1][0].headers["ignore_result"] is False
    conveyor.configure(task_default_priority=6, task_ignore_result=True,
                       task_default_queue="moved")
    conveyor._broker = capture  # type: ignore[assignment]  # configure() closed it
    add.delay(1, 2)
    envelope, _, routing_key, _ = capture.sent[-1]
    assert envelope.properties["priority"] == 6
    assert envelope.headers["ignore_result"] is True
    assert routing_key == "moved"


def test_a_replaced_json_codec_takes_the_general_path(app: tuple[Conveyor, Capture]) -> None:
    conveyor, capture = app
    assert conveyor.producer.plan("proj.add", {}) is not None
    registry.register("json", "application/json", "utf-8",
                      lambda value: json.dumps(value, separators=(",", ":")).encode(),
                      json_loads)
    try:
        assert conveyor.producer.plan("proj.add", {}) is None
        conveyor.send_task("proj.add", (1, 2))
        assert capture.sent[-1][0].body.startswith(b"[[1,2],{}")
    finally:
        registry.register("json", "application/json", "utf-8", json_dumps, json_loads)
    assert conveyor.producer.plan("proj.add", {}) is not None


def test_send_many_mixes_both_paths_and_keeps_the_order(
    app: tuple[Conveyor, Capture],
) -> None:
    conveyor, capture = app
    calls: list[tuple[str, Sequence[Any], dict[str, Any], dict[str, Any]]] = [
        ("proj.add", (1,), {}, {"group_id": "g", "group_index": 0}),
        ("proj.add", (2,), {}, {"group_id": "g", "group_index": 1, "headers": {"x": 1}}),
        ("proj.mul", (3,), {}, {"group_id": "g", "group_index": 2}),
        ("proj.add", (4,), {}, {"group_id": "g", "group_index": 3, "queue": "q2"}),
        ("proj.add", (5,), {}, {"group_id": "g", "group_index": 4, "countdown": 10}),
    ]
    results = conveyor.send_many(calls)
    sent = {envelope.headers["id"]: (envelope, routing_key, delay)
            for envelope, _, routing_key, delay in capture.sent}
    assert [capture.sent[i][0].headers["id"] for i in range(5)] == [
        results[4].id, results[0].id, results[1].id, results[2].id, results[3].id]
    for (name, args, kwargs, options), result in zip(calls, results, strict=True):
        envelope, routing_key, delay = sent[result.id]
        expected, target = general(conveyor, name, args, kwargs,
                                   {**options, "task_id": result.id})
        if "countdown" in options:
            assert delay is not None
            assert envelope.headers["eta"] is not None
            continue
        assert delay is None
        assert_same(envelope, expected)
        assert routing_key == target.routing_key


def test_unknown_options_are_still_refused(app: tuple[Conveyor, Capture]) -> None:
    conveyor, _ = app
    with pytest.raises(Exception, match="did you mean 'countdown'"):
        conveyor.send_task("proj.add", (1,), countdwn=3)
    with pytest.raises(Exception, match="did you mean 'queue'"):
        conveyor.send_many([("proj.add", (1,), {}, {"queu": "x"})])
