"""The lean encoder (CallTemplate) writes what the general one (encode_task) writes."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from conveyor import protocol
from conveyor.envelope import Envelope, new_envelope
from conveyor.errors import EncodeError
from conveyor.protocol import CallTemplate, TaskHeaders, TaskMessage, header_json

TEXT = ["", "plain", "héllo", "日本語", "emoji 🎉", "tab\tnew\nline", 'quote " back \\',
        "\x00\x1f\x7f", "\ud800 lone surrogate", "</script>"]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["none", "bool", "int", "bigint", "float", "str", "datetime", "decimal", "uuid",
             "bytes"]
    if depth < 3:
        kinds += ["list", "tuple", "dict"]
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-1000, 1000)
    if kind == "bigint":
        return rng.randint(-(2**80), 2**80)
    if kind == "float":
        return rng.choice([0.0, -0.0, 1.5, 1e300, 1e-300, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return rng.choice(TEXT)
    if kind == "datetime":
        return datetime(2026, 1, 2, 3, 4, 5, rng.randint(0, 999999), tzinfo=UTC)
    if kind == "decimal":
        return Decimal("3.14159")
    if kind == "uuid":
        return uuid.UUID(int=rng.getrandbits(128))
    if kind == "bytes":
        return rng.choice([b"text", b"\xff\xfe binary"])
    size = rng.randint(0, 4)
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(size)]
    if kind == "tuple":
        return tuple(random_value(rng, depth + 1) for _ in range(size))
    return {rng.choice(TEXT) + str(i): random_value(rng, depth + 1) for i in range(size)}


def reference(
    template: dict[str, Any], call: dict[str, Any]
) -> Envelope:
    """What the general path (TaskMessage + encode_task) writes for the same call."""
    headers = TaskHeaders(
        id=call["task_id"],
        task=template["task"],
        retries=template.get("retries", 0),
        group=call["group"],
        group_index=call["group_index"],
        root_id=call["root_id"] or call["task_id"],
        parent_id=call["parent_id"],
        shadow=template.get("shadow"),
        time_limit=template.get("time_limit"),
        soft_time_limit=template.get("soft_time_limit"),
        origin=template.get("origin"),
        ignore_result=template.get("ignore_result"),
    )
    message = TaskMessage(
        headers=headers,
        args=list(call["args"] or ()),
        kwargs=dict(call["kwargs"] or {}),
        reply_to=call["reply_to"],
        correlation_id=call["task_id"],
        priority=call["priority"],
        delivery_mode=call["delivery_mode"],
    )
    return protocol.encode_task(message)


def lean(template: dict[str, Any], call: dict[str, Any]) -> Envelope:
    return CallTemplate(**template).encode(
        call["task_id"], call["args"], call["kwargs"], call["group"], call["group_index"],
        call["root_id"], call["parent_id"], call["reply_to"], call["priority"],
        call["delivery_mode"])


def assert_same(got: Envelope, expected: Envelope) -> None:
    assert got.body == expected.body
    assert got.content_type == expected.content_type
    assert got.content_encoding == expected.content_encoding
    assert list(got.headers.items()) == list(expected.headers.items())  # order too
    assert list(got.properties.items()) == list(expected.properties.items())
    if got.headers_json is not None:
        assert got.headers_json == json.dumps(expected.headers)


def random_template(rng: random.Random) -> dict[str, Any]:
    template: dict[str, Any] = {"task": rng.choice(["proj.add", "tâche.é", "a\"b"])}
    if rng.random() < 0.3:
        template["shadow"] = rng.choice([None, "shadow", "ombré"])
    if rng.random() < 0.3:
        template["retries"] = rng.randint(0, 5)
    if rng.random() < 0.4:
        template["time_limit"] = rng.choice([None, 30, 2.5, float("inf")])
        template["soft_time_limit"] = rng.choice([None, 20, 1.25])
    if rng.random() < 0.3:
        template["origin"] = rng.choice([None, "", "gen1@host", "gén@hôte"])
    template["ignore_result"] = rng.choice([None, True, False])
    return template


def random_call(rng: random.Random) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    in_group = rng.random() < 0.5
    args: Any = [random_value(rng) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.3:
        args = tuple(args)
    if rng.random() < 0.1:
        args = None
    kwargs: Any = {rng.choice(TEXT) + str(i): random_value(rng) for i in range(rng.randint(0, 3))}
    if rng.random() < 0.1:
        kwargs = None
    return {
        "task_id": task_id,
        "args": args,
        "kwargs": kwargs,
        "group": str(uuid.uuid4()) if in_group else None,
        "group_index": rng.randint(0, 999) if in_group else None,
        "root_id": rng.choice([None, str(uuid.uuid4())]),
        "parent_id": rng.choice([None, str(uuid.uuid4())]),
        "reply_to": rng.choice(["", "9102d539-7e50-3855-9b1a-bab045237cd6"]),
        "priority": rng.choice([None, 0, 5, 9]),
        "delivery_mode": rng.choice([1, 2]),
    }


@pytest.mark.parametrize("seed", range(20))
def test_lean_encoding_matches_encode_task(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        template, call = random_template(rng), random_call(rng)
        got = lean(template, call)
        assert_same(got, reference(template, call))


@pytest.mark.parametrize("seed", range(5))
def test_one_template_writes_each_of_a_run_of_calls_as_if_alone(seed: int) -> None:
    # A template keeps what it wrote of the last call's group for the next (a group's
    # members come in a row): a change of group must never carry the old one over.
    rng = random.Random(seed)
    template = random_template(rng)
    made = CallTemplate(**template)
    groups = [None, str(uuid.uuid4()), str(uuid.uuid4()), "grôupe", uuid.UUID(int=3)]
    for _ in range(100):
        call = random_call(rng)
        call["group"] = rng.choice(groups)
        got = made.encode(
            call["task_id"], call["args"], call["kwargs"], call["group"],
            call["group_index"], call["root_id"], call["parent_id"], call["reply_to"],
            call["priority"], call["delivery_mode"])
        assert_same(got, reference(template, call))


def test_common_calls_come_with_their_headers_as_json() -> None:
    call = random_call(random.Random(1))
    envelope = lean({"task": "proj.add", "ignore_result": True}, call)
    assert envelope.headers_json == json.dumps(envelope.headers)


@pytest.mark.parametrize("value", [
    uuid.UUID(int=7), ("tuple",), {"a": 1}, b"bytes", 1.5, True,
])
def test_unusual_header_values_are_right_but_not_pre_rendered(value: Any) -> None:
    call = random_call(random.Random(2))
    call["group"] = value
    template = {"task": "proj.add"}
    got = lean(template, call)
    assert_same(got, reference(template, call))
    if header_json(value) is None:
        assert got.headers_json is None


def test_unusual_template_values_are_right_but_not_pre_rendered() -> None:
    call = random_call(random.Random(3))
    template = {"task": "proj.add", "shadow": uuid.UUID(int=1)}
    got = lean(template, call)
    assert_same(got, reference(template, call))
    assert got.headers_json is None


def test_call_without_arguments_has_celerys_body() -> None:
    envelope = lean({"task": "proj.noop"}, {**random_call(random.Random(4)), "args": (),
                                            "kwargs": {}})
    assert envelope.body == (b'[[], {}, {"callbacks": null, "errbacks": null, '
                             b'"chain": null, "chord": null}]')
    assert envelope.headers["argsrepr"] == "()"
    assert envelope.headers["kwargsrepr"] == "{}"


def test_long_reprs_are_truncated_as_encode_task_does() -> None:
    call = {**random_call(random.Random(5)), "args": ["x" * 5000], "kwargs": {"k": "y" * 5000}}
    template = {"task": "proj.add"}
    got = lean(template, call)
    assert_same(got, reference(template, call))
    assert len(got.headers["argsrepr"]) == protocol.REPR_LIMIT


def test_each_message_has_its_own_mutable_header_values() -> None:
    template = CallTemplate("proj.add")
    first = template.encode("a", (), {}, None, None, None, None, "", None, 2)
    second = template.encode("b", (), {}, None, None, None, None, "", None, 2)
    assert first.headers["stamps"] is not second.headers["stamps"]
    assert first.headers["timelimit"] is not second.headers["timelimit"]


def circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize("bad", [{1, 2}, object(), circular()])
def test_unencodable_arguments_fail_as_in_encode_task(bad: Any) -> None:
    call = {**random_call(random.Random(6)), "args": [bad]}
    template = {"task": "proj.add"}
    with pytest.raises(EncodeError) as expected:
        reference(template, call)
    with pytest.raises(EncodeError) as got:
        lean(template, call)
    assert str(got.value) == str(expected.value)


def test_new_ids_are_uuid4_text() -> None:
    ids = [protocol.new_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_its_parents_ids() -> None:
    protocol.new_id()  # the parent now holds unused ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, protocol.new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child_id = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parents = {protocol.new_id() for _ in range(200)}
    assert child_id not in parents


def test_new_envelope_is_an_envelope_with_every_field() -> None:
    values: dict[str, Any] = {
        "body": b"[]", "content_type": "application/json", "content_encoding": "utf-8",
        "headers": {"task": "t"}, "properties": {"priority": 0}, "headers_json": '{"task": "t"}',
    }
    made = new_envelope(**values)
    assert [field.name for field in dataclasses.fields(Envelope)] == list(values)
    assert [getattr(made, name) for name in values] == list(values.values())
    assert made == Envelope(**values)
