"""Signatures copied and groups sent the quick way give what the general way gives."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from tests.unit.producing import Capture, assert_same, general, make_app

from conveyor import Conveyor
from conveyor.canvas import Signature, chord, group, signature
from conveyor.request import Request, request_context


def clone_the_general_way(sig: Signature, args: Any = (), kwargs: Any = None,
                          **options: Any) -> Signature:
    """Signature.clone as written for every kind of signature."""
    copy = signature(dict(sig), sig.app)
    if not copy.immutable:
        copy["args"] = [*args, *copy.args]
        copy["kwargs"] = {**copy.kwargs, **(kwargs or {})}
    copy["options"] = {**copy.options, **options}
    return copy


@pytest.fixture
def app() -> Iterator[tuple[Conveyor, Capture]]:
    made = make_app()
    yield made
    made[0].close()


def random_signature(rng: random.Random, conveyor: Conveyor) -> Signature:
    sig = Signature(
        "proj.add",
        [rng.randint(0, 9) for _ in range(rng.randint(0, 2))],
        {f"k{i}": i for i in range(rng.randint(0, 2))},
        rng.choice([{}, {"queue": "q"}, {"priority": 3, "task_id": "fixed"}]),
        subtask_type=rng.choice([None, "other"]),
        immutable=rng.random() < 0.3,
        app=rng.choice([conveyor, None]),
    )
    if rng.random() < 0.2:
        sig["chord_size"] = 3  # extra keys are dropped by a copy
    return sig


@pytest.mark.parametrize("seed", range(10))
def test_clone_of_a_plain_signature_is_the_general_copy(
    app: tuple[Conveyor, Capture], seed: int
) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        sig = random_signature(rng, app[0])
        args = rng.choice([(), (1,), [2, 3]])
        kwargs = rng.choice([None, {}, {"z": 1}, {"k0": "over"}])
        options = rng.choice([{}, {"countdown": 3}, {"queue": "other", "task_id": "x"}])
        got = sig.clone(args, kwargs, **options)
        expected = clone_the_general_way(sig, args, kwargs, **options)
        assert type(got) is type(expected)
        assert list(got.items()) == list(expected.items())
        assert got.app is expected.app
        for part in ("args", "kwargs", "options"):
            assert got[part] is not sig[part]  # a copy never shares them


def sent_by_id(capture: Capture) -> dict[str, Any]:
    return {envelope.headers["id"]: (envelope, routing_key, delay)
            for envelope, _, routing_key, delay in capture.sent}


def test_group_members_are_sent_as_single_calls_would_be(
    app: tuple[Conveyor, Capture],
) -> None:
    conveyor, capture = app
    members = [
        Signature("proj.add", (1, 2), app=conveyor),
        Signature("proj.add", (), {"x": 1}, {"queue": "other"}, app=conveyor),
        Signature("proj.mul", (3,), options={"priority": 5}, app=conveyor),
        Signature("proj.add", (4,), options={"headers": {"x-extra": "yes"}}, app=conveyor),
        Signature("proj.add", (5,), immutable=True, app=conveyor),
    ]
    result = group(members).apply_async(queue="shared")
    sent = sent_by_id(capture)
    assert len(sent) == len(members)
    for index, (member, member_result) in enumerate(zip(members, result, strict=True)):
        envelope, routing_key, delay = sent[member_result.id]
        options = {**member.options, "task_id": member_result.id, "group_id": result.id,
                   "group_index": index, "queue": "shared"}
        expected, target = general(conveyor, member.task, member.args, member.kwargs, options)
        assert delay is None
        assert_same(envelope, expected)
        assert routing_key == target.routing_key
    assert all(not member.options for member in members[:1])  # the caller's are untouched


BARE_CALLS = [((1, 2), None), ((), {"x": 1}), ((3,), {"y": [1, "é"]}), ((), None)]


@pytest.mark.parametrize("shared", [
    {},
    {"queue": "shared"},
    {"queue": "shared", "priority": 7, "ignore_result": True},
    {"routing_key": "by-key", "time_limit": 30},
    {"root_id": "the-root", "parent_id": "the-parent"},  # per call: each planned alone
    {"eta": datetime(2040, 1, 1, tzinfo=UTC)},  # each goes on its own, delayed
])
@pytest.mark.parametrize("in_task", [False, True])
def test_a_group_of_one_tasks_bare_calls_is_sent_as_single_calls_would_be(
    app: tuple[Conveyor, Capture], shared: dict[str, Any], in_task: bool
) -> None:
    # ``group(task.s(...) for ...)``, the usual group, is sent with its plan and route
    # looked up once for all its members: each message must still be the general one.
    conveyor, capture = app
    members = [Signature("proj.add", args, kwargs, app=conveyor) for args, kwargs in BARE_CALLS]
    parent = Request(id="parent-id", root_id="root-id", called_directly=not in_task)
    with request_context(parent):
        result = group(members).apply_async(group_id="the-group", **shared)
        sent = sent_by_id(capture)
        assert len(capture.sent) == len(members)
        if "eta" not in shared:  # published together, in order
            assert [envelope.headers["id"] for envelope, *_ in capture.sent] == [
                member_result.id for member_result in result]
        for index, (member, member_result) in enumerate(zip(members, result, strict=True)):
            envelope, routing_key, delay = sent[member_result.id]
            options = {"task_id": member_result.id, "group_id": "the-group",
                       "group_index": index, **shared}
            expected, target = general(conveyor, member.task, member.args, member.kwargs,
                                       options)
            assert_same(envelope, expected)
            assert routing_key == target.routing_key
            assert (delay is None) == ("eta" not in shared)
            if in_task and "root_id" not in shared:
                assert (envelope.headers["root_id"], envelope.headers["parent_id"]) == (
                    "root-id", "parent-id")
    assert all(not member.options for member in members)  # the caller's are untouched


OPTION_POOL: list[tuple[str, Any]] = [
    ("queue", "q1"), ("queue", "q2"), ("priority", 3), ("priority", 0), ("routing_key", "rk"),
    ("exchange", ""), ("time_limit", 10), ("soft_time_limit", 5), ("ignore_result", True),
    ("shadow", "sh"), ("retries", 2), ("root_id", "R"), ("parent_id", "P"),
    ("delivery_mode", 1), ("reply_to", "rq"), ("origin", "o@h"), ("headers", {"x": 1}),
    ("serializer", "json"), ("acks_late", True),
]


@pytest.mark.parametrize("seed", range(20))
def test_random_groups_are_sent_as_their_members_alone_would_be(seed: int) -> None:
    # Members with and without options of their own, of one task or two, given options
    # at the group, sent inside a task or not: each message is the general path's.
    rng = random.Random(seed)
    for _ in range(25):
        conveyor, capture = make_app(
            task_routes=rng.choice([None, {"proj.mul": {"queue": "mulq"}}]))
        names = rng.choice([["proj.add"], ["proj.add", "proj.mul"]])
        members = []
        for index in range(rng.randint(1, 4)):
            own = dict(rng.sample(OPTION_POOL, rng.randint(0, 2))) if rng.random() < 0.5 else {}
            if rng.random() < 0.1:
                own["task_id"] = f"chosen-{index}"
            members.append(Signature(rng.choice(names), [rng.randint(0, 9)] * rng.randint(0, 2),
                                     options=own, app=conveyor))
        shared = dict(rng.sample(OPTION_POOL, rng.randint(0, 3)))
        parent = Request(id="parent-id", root_id="root-id", called_directly=rng.random() < 0.7)
        try:
            with request_context(parent):
                result = group(members).apply_async(group_id="G", **shared)
                sent = sent_by_id(capture)
                for index, (member, member_result) in enumerate(
                        zip(members, result, strict=True)):
                    options = {**member.options, "task_id": member_result.id, "group_id": "G",
                               "group_index": index, **shared}
                    expected, target = general(conveyor, member.task, member.args,
                                               member.kwargs, options)
                    envelope, routing_key, _ = sent[member_result.id]
                    assert_same(envelope, expected)
                    assert routing_key == target.routing_key
        finally:
            conveyor.close()


def test_chord_header_members_carry_the_body(app: tuple[Conveyor, Capture]) -> None:
    conveyor, capture = app
    conveyor.configure(result_backend="memory://canvas-send")
    conveyor._broker = capture  # type: ignore[assignment]
    header = [Signature("proj.add", (i, i), app=conveyor) for i in range(3)]
    body = Signature("proj.sum", app=conveyor)
    chord(header, body).apply_async()
    embeds = [envelope.body for envelope, *_ in capture.sent]
    assert len(embeds) == 3
    assert all(b'"chord": {"task": "proj.sum"' in body_bytes for body_bytes in embeds)
    indexes = sorted(envelope.headers["group_index"] for envelope, *_ in capture.sent)
    assert indexes == [0, 1, 2]


@pytest.mark.parametrize("shared", [
    {"queue": "shared"},
    {"queue": "shared", "priority": 7},
    {"headers": {"x-extra": "yes"}, "acks_late": True},  # the general path, for each
    {"queue": "shared", "link": Signature("proj.log")},
    {"queue": "shared", "root_id": "the-root", "parent_id": "the-parent"},  # per call
    {"root_id": "the-root"},
])
def test_group_options_apply_over_each_members_own(
    app: tuple[Conveyor, Capture], shared: dict[str, Any]
) -> None:
    conveyor, capture = app
    members = [
        Signature("proj.add", (1, 2), app=conveyor),
        Signature("proj.add", (3, 4), options={"queue": "own", "priority": 1}, app=conveyor),
        Signature("proj.mul", (), {"x": 5}, {"task_id": "chosen"}, app=conveyor),
    ]
    result = group(members).apply_async(group_id="the-group", **shared)
    assert result.id == "the-group"
    assert result.results[2].id == "chosen"
    sent = sent_by_id(capture)
    assert len(capture.sent) == len(members)
    for index, (member, member_result) in enumerate(zip(members, result, strict=True)):
        envelope, routing_key, delay = sent[member_result.id]
        options = {**member.options, "task_id": member_result.id, "group_id": "the-group",
                   "group_index": index, **shared}
        expected, target = general(conveyor, member.task, member.args, member.kwargs, options)
        assert delay is None
        assert_same(envelope, expected)
        assert routing_key == target.routing_key
    assert "task_id" not in members[0].options  # the caller's signatures are untouched


def test_a_group_countdown_delays_every_member(app: tuple[Conveyor, Capture]) -> None:
    conveyor, capture = app
    members = [Signature("proj.add", (i, i), app=conveyor) for i in range(3)]
    group(members).apply_async(countdown=30)
    delays = [delay for _, _, _, delay in capture.sent]
    assert len(delays) == 3
    assert all(delay is not None and 25 < delay <= 30 for delay in delays), delays


def test_arguments_given_to_a_group_are_prepended_to_each_member(
    app: tuple[Conveyor, Capture],
) -> None:
    conveyor, capture = app
    members = [Signature("proj.add", (1,), app=conveyor),
               Signature("proj.add", (2,), immutable=True, app=conveyor)]
    result = group(members).apply_async((9,), queue="shared")
    sent = sent_by_id(capture)
    bodies = [json.loads(sent[r.id][0].body)[0] for r in result]
    assert bodies == [[9, 1], [2]]
    assert {routing_key for _, routing_key, _ in sent.values()} == {"shared"}
