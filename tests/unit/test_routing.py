"""The pure AMQP 0-9-1 matching rules brokers without native exchanges route with."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.errors import ConfigurationError
from conveyor.routing import (
    Binding,
    Exchange,
    Queue,
    binding_matches,
    headers_match,
    route,
    topic_matches,
)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        # '#' alone matches everything, the empty key included.
        ("#", "", True),
        ("#", "a", True),
        ("#", "a.b.c", True),
        # '#' is zero or more words.
        ("a.#", "a", True),
        ("a.#", "a.b", True),
        ("a.#", "a.b.c", True),
        ("a.#", "b.a", False),
        ("a.#", "ab", False),
        ("#.c", "c", True),
        ("#.c", "a.b.c", True),
        ("#.c", "a.c.d", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y", False),
        ("#.#", "a", True),
        # '*' is exactly one word.
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.b", "a.b", True),
        ("*.b", "b", False),
        ("*.b", "a.x.b", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("*.*", "a.b", True),
        ("*.*", "a", False),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
        ("a.*.#", "a.b.c.d", True),
        # The empty key has no words: only '#' (and the empty pattern) match it.
        ("*", "", False),
        ("#.*", "", False),
        ("a.#", "", False),
        ("", "", True),
        ("", "a", False),
        # Without wildcards, a pattern is an exact key.
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.b", "A.B", False),
        # Empty words are words.
        ("a.*.c", "a..c", True),
        ("*", ".", False),
    ],
)
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


ALL = {"x-match": "all", "format": "pdf", "type": "report"}
ANY = {"x-match": "any", "format": "pdf", "type": "report"}


@pytest.mark.parametrize(
    ("arguments", "headers", "expected"),
    [
        (ALL, {"format": "pdf", "type": "report"}, True),
        (ALL, {"format": "pdf", "type": "report", "extra": 1}, True),
        (ALL, {"format": "pdf"}, False),
        (ALL, {"format": "pdf", "type": "log"}, False),
        (ANY, {"format": "pdf"}, True),
        (ANY, {"type": "report", "format": "zip"}, True),
        (ANY, {"format": "zip"}, False),
        (ANY, {}, False),
        # x-match defaults to all, and is case-insensitive.
        ({"format": "pdf", "type": "report"}, {"format": "pdf"}, False),
        ({"format": "pdf"}, {"format": "pdf"}, True),
        ({"x-match": "ANY", "format": "pdf", "type": "report"}, {"type": "report"}, True),
        # Other x- arguments are not headers to match.
        ({"x-match": "all", "x-other": "1"}, {}, True),
        ({"x-match": "any", "x-other": "1"}, {"x-other": "1"}, False),
        # A binding without headers to match: all matches everything, any nothing.
        ({}, {"format": "pdf"}, True),
        ({"x-match": "any"}, {"format": "pdf"}, False),
        # A value of None asks only that the header be present.
        ({"format": None}, {"format": "anything"}, True),
        ({"format": None}, {"type": "report"}, False),
        # Values must be equal, not just present.
        ({"retries": 3}, {"retries": 3}, True),
        ({"retries": 3}, {"retries": "3"}, False),
    ],
)
def test_headers_matching(
    arguments: dict[str, Any], headers: dict[str, Any], expected: bool
) -> None:
    assert headers_match(arguments, headers) is expected


def test_direct_matching_is_exact_key_equality() -> None:
    binding = Binding("ex", "q", "tasks.add")
    assert binding_matches("direct", binding, "tasks.add", {})
    assert not binding_matches("direct", binding, "tasks.ad", {})
    assert not binding_matches("direct", binding, "tasks.*", {})
    assert not binding_matches("direct", Binding("ex", "q", "tasks.*"), "tasks.add", {})
    assert binding_matches("direct", Binding("ex", "q", ""), "", {})


def test_fanout_matches_any_key_and_headers_ignore_the_key() -> None:
    assert binding_matches("fanout", Binding("ex", "q", "a"), "b", {})
    headers_binding = Binding("ex", "q", "a", {"k": "v"})
    assert binding_matches("headers", headers_binding, "unrelated", {"k": "v"})
    assert not binding_matches("headers", headers_binding, "a", {})


def test_unknown_exchange_type_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        binding_matches("x-delayed", Binding("ex", "q"), "", {})
    with pytest.raises(ConfigurationError):
        Exchange("ex", "x-delayed")  # type: ignore[arg-type]


def test_route_returns_each_matching_queue_once_in_binding_order() -> None:
    bindings = [
        Binding("ex", "second", "a.*"),
        Binding("ex", "first", "#"),
        Binding("ex", "second", "a.b"),
        Binding("ex", "never", "b.#"),
    ]
    assert route("topic", bindings, "a.b", {}) == ["second", "first"]
    assert route("topic", bindings, "c", {}) == ["first"]
    assert route("direct", bindings, "a.b", {}) == ["second"]
    assert route("direct", [], "a.b", {}) == []


def test_queue_defaults_follow_celery() -> None:
    queue = Queue("celery")
    assert queue.effective_exchange == Exchange("celery", "direct")
    assert queue.all_bindings() == (Binding("celery", "celery", "celery"),)
    extra = Binding("other", "celery", "k")
    topic = Queue("q", Exchange("t", "topic"), "a.#", bindings=(extra,), max_priority=9)
    assert topic.all_bindings() == (Binding("t", "q", "a.#"), extra)
    assert topic.declared_arguments() == {"x-max-priority": 9}
    with pytest.raises(ConfigurationError):
        Queue("")
